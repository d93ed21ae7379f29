"""The scenarios' audit (accounting.py) on a hand-made run: a learner restarted from its
checkpoint at v2 re-trained v3; only the lineage that led to the final version counts."""
from __future__ import annotations

import pytest
from accounting import audit, final_lineage

from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig


def line(v: int, sids: list[str], t: float, sync: float = 0.1) -> dict:
    return {"policy_version": v, "sample_ids": sids, "time": t, "sync_seconds": sync}


def test_final_lineage_is_the_last_line_of_each_version():
    lines = [line(1, ["a"], 1), line(2, ["b"], 2), line(3, ["c"], 3), line(4, ["d"], 4),  # killed after v4
             line(3, ["c"], 20), line(4, ["e"], 21), line(5, ["f"], 22)]  # resumed at v2
    assert [x["sample_ids"] for x in final_lineage(lines)] == [["a"], ["b"], ["c"], ["e"], ["f"]]


def test_audit_accounts_for_every_record_and_finds_a_sample_trained_twice(redis_url, run_id):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "buffer"))
    from buffer_records import make_experience

    buf = ExperienceBuffer.open(BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id))
    try:
        buf.put([make_experience(f"p{i}/e0/s0", version=0) for i in range(5)])
        stale = buf.get(1, "learner-0", learner_version=5, max_policy_lag=1)  # p0 dropped as stale ...
        assert stale.stale_dropped == 1
        buf.r.xadd(buf.keys.experience, {"r": b"garbage"})  # ... a poison record ...
        first = buf.get(2, "learner-0", learner_version=0, max_policy_lag=1)
        second = buf.get(2, "learner-0", learner_version=0, max_policy_lag=1)
        buf.ack(first, tag="v1")
        buf.ack(second, tag="v2")
        batch = buf.get(5, "learner-0", learner_version=0, max_policy_lag=1, block_ms=0)  # ... dead-lettered
        assert batch.dead_lettered == 1 and not batch.records
        lines = [line(1, first.sample_ids, 1.0, 0.5), line(2, second.sample_ids, 4.0, 2.5)]
        acc = audit(buf.r, buf.cfg.run_id, lines)
        assert (acc.written, acc.trained, acc.committed, acc.unread) == (6, 4, 4, 0)
        assert acc.dropped == {"stale": 1, "invalid": 1}
        assert (acc.longest_sync_s, acc.stall_s, acc.iterations) == (2.5, 3.0, 2)
        acc.check()
        assert "records written 6 / trained 4 / dropped 2 (invalid 1, stale 1)" in acc.summary("x")
        twice = audit(buf.r, buf.cfg.run_id, lines + [line(3, first.sample_ids[:1], 5.0)])
        with pytest.raises(AssertionError, match="1 sample.s. trained twice"):
            twice.check()
        buf.r.xadd(buf.keys.experience, {"r": b"never read"})
        buf.r.xdel(buf.keys.experience, buf.r.xadd(buf.keys.experience, {"r": b"vanished"}))
        with pytest.raises(AssertionError, match="8 records written but 7 accounted for"):
            audit(buf.r, buf.cfg.run_id, lines).check()
    finally:
        buf.close()

