"""A learner killed with SIGKILL and restarted trains every record exactly once (real processes).

Run 1 gets records for 4 iterations and is killed while it waits for more: the checkpoint
at version 3 is on disk (and its records acked), iteration 4 is trained but neither
checkpointed nor acked. Run 2
restores version 3; the records of the lost iteration are reclaimed from Redis
(XAUTOCLAIM) and trained once by the restored model. The lineage of the final model
(run 1 up to the restored version, then run 2) must hold every sample_id exactly once.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from learner_testkit import build_tiny, config, random_records, read_jsonl, start_learner, write_config

from instructrl.buffer import ExperienceBuffer, Keys, redis_from_url
from instructrl.learner.reader import ExperienceReader

STEPS, BATCH = 6, 4


def _wait(pred, timeout_s: float, proc=None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"learner exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_resume_trains_each_record_once(tmp_path, redis_url, run_id):
    model_dir = build_tiny(tmp_path / "sft")
    cfg = config(tmp_path, model_dir, redis_url, run_id, batch_size=BATCH, minibatch_size=2,
                 micro_batch_size=1, max_iterations=STEPS, actor_lr=1e-3)
    cfg.checkpoint.every = 3
    cfg.logging.log_sample_ids = True
    records = random_records(STEPS * BATCH, vocab=300, seed=1)
    with ExperienceBuffer.open(cfg.buffer) as buf:  # 4 batches: run 1 trains v4, then waits for data
        buf.put(records[:4 * BATCH])
    cfg_file = write_config(cfg, tmp_path / "learner.yaml")
    log1, log2 = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"

    run1 = start_learner(cfg_file, tmp_path / "run1.log", f"logging.jsonl={log1}")
    try:
        _wait(lambda: any(x["policy_version"] >= 4 for x in read_jsonl(log1)), 180, run1, "iteration 4")
    finally:
        os.killpg(run1.pid, signal.SIGKILL)
        run1.wait(10)
    lines1 = read_jsonl(log1)
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(records[4 * BATCH:])

    run2 = start_learner(cfg_file, tmp_path / "run2.log", f"logging.jsonl={log2}")
    try:
        assert run2.wait(180) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    finally:
        if run2.poll() is None:
            os.killpg(run2.pid, signal.SIGKILL)
            run2.wait(10)
    lines2 = read_jsonl(log2)

    restored = lines2[0]["policy_version"] - 1
    assert restored == 3, "run 2 resumes from the checkpoint at version 3"
    assert max(x["policy_version"] for x in lines1) > restored, "run 1 trained past its last checkpoint"
    same = [x for x in lines1 if x["policy_version"] == restored + 1][0]
    for key in ("reward_mean", "policy_loss", "value_loss", "approx_kl"):  # the curve continues exactly
        assert lines2[0][key] == pytest.approx(same[key], rel=1e-4, abs=1e-6), key
    lineage = [x for x in lines1 if x["policy_version"] <= restored] + lines2
    assert [x["policy_version"] for x in lineage] == list(range(1, STEPS + 1))
    trained = [sid for x in lineage for sid in x["sample_ids"]]
    assert sorted(trained) == sorted(r.sample_id for r in records)  # each exactly once
    assert lineage[-1]["samples_trained"] == STEPS * BATCH
    assert lineage[-1]["optimizer_step"] == STEPS * BATCH // 2

    client = redis_from_url(redis_url)
    keys = Keys.for_run(run_id)
    assert client.hlen(keys.seen) == STEPS * BATCH  # every sample committed
    assert client.xlen(keys.experience) == 0  # and acked (an acked entry is deleted)
    client.close()


def test_replayed_commit_of_a_checkpoint(tmp_path, redis_url, run_id):
    """Killed after the checkpoint, before the ack: the restart acks the checkpoint's records."""
    cfg = config(tmp_path, "unused", redis_url, run_id, batch_size=3)
    records = random_records(5, vocab=300, seed=2)
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(records)
        reader = ExperienceReader(buf, "learner-0", 3, cfg.pacing)
        got, lags = reader.fill(0, lambda: False)
        assert [r.sample_id for r in got] == [r.sample_id for r in records[:3]] and lags == [0, 0, 0]
        saved = reader.uncommitted()  # what the checkpoint would hold; then "SIGKILL"
        restarted = ExperienceReader(buf, "learner-0", 2, cfg.pacing)
        restarted.commit_saved(saved, tag="v1")
        cfg.buffer.claim_idle_ms = 0  # reclaim everything pending now: the committed ones are filtered
        again = ExperienceReader(ExperienceBuffer.open(cfg.buffer), "learner-0", 2, cfg.pacing)
        rest, _ = again.fill(1, lambda: False)
        assert sorted(r.sample_id for r in rest) == sorted(r.sample_id for r in records[3:])


@pytest.mark.slow
def test_an_iteration_is_logged_before_its_checkpoint(tmp_path, redis_url, run_id):
    """A learner killed after a checkpoint resumes past it and never trains that iteration
    again: its line (the trained sample_ids) must already be in the log, or the lineage's
    trained log misses records the checkpoint committed (found by the cluster bed's scenario 4,
    a SIGKILL between the checkpoint and the line)."""
    import pathlib

    model_dir = build_tiny(tmp_path / "sft")
    cfg = config(tmp_path, model_dir, redis_url, run_id, batch_size=BATCH, minibatch_size=2,
                 micro_batch_size=1, max_iterations=2)
    cfg.checkpoint.every = 1
    cfg.logging.log_sample_ids = True
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(random_records(2 * BATCH, vocab=300, seed=3))
    log = tmp_path / "run.jsonl"
    proc = start_learner(write_config(cfg, tmp_path / "learner.yaml"), tmp_path / "run.log", f"logging.jsonl={log}")
    try:
        assert proc.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    lines = {x["policy_version"]: x for x in read_jsonl(log)}
    for v in (1, 2):
        state = pathlib.Path(cfg.checkpoint.dir) / f"iteration-{v:08d}" / "state.json"
        assert lines[v]["time"] <= state.stat().st_mtime, f"v{v}: the checkpoint was written before the line"
