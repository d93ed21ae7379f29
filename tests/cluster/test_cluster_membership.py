"""Scenario 1 of issue 13: the chart as shipped for the bed (ci/cluster-values.yaml: default-shaped,
2 rollout replicas with their workers, the bundled Redis, one learner rank) runs for real.

The loop runs several iterations; the learner lists both replicas (distinct ids, so two
addresses); after every weight broadcast both replicas report the learner's policy_version;
both replicas produce experience (replica_id = their pod name), and the learner trains on both.
"""
from __future__ import annotations

import time

import pytest
import yaml
from scenario_support import CLUSTER_VALUES, BundledRedis, demo_prompts, learner_log, poll, replica_labels, scrape

pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]

ITERATIONS = 5
# Every pod ready: vLLM and DeepSpeed load in 1-2 minutes on 2 shared cores (up to 3.5 under load).
START_TIMEOUT_S = 300
# Then ITERATIONS iterations: a few seconds once experience flows, but today's worker waits up to
# ~2 min more after its rollout container is serving (its channel sits in gRPC reconnect backoff).
RUN_TIMEOUT_S = 240


def all_produced(rollouts: dict[str, str]) -> bool:
    """Whether every rollout pod's worker has acked a prompt under its own id (its metrics)."""
    try:
        return all(replica_labels(scrape(ip, 9091), "instructrl_rollout_prompts_acked_total").get(name, 0) > 0
                   for name, ip in rollouts.items())
    except OSError:  # a worker's metrics not answering this time
        return False


def test_two_rollout_replicas_register_sync_and_produce(make_cluster, models_claim, prebuilt_ops):
    t0 = time.monotonic()
    cluster = make_cluster(yaml.safe_load(CLUSTER_VALUES.read_text()), claims={"instructrl-models": models_claim})
    (redis_pod,) = cluster.wait_ready("redis", timeout_s=60)
    buffer = BundledRedis(redis_pod.ip, cluster.secret("redis", "password"))
    # prompts for the whole run (today's workers generate as fast as they can, stale or not)
    buffer.enqueue(demo_prompts(64), epochs=50)
    (learner,) = cluster.wait_ready("learner", timeout_s=START_TIMEOUT_S)
    left = START_TIMEOUT_S - (time.monotonic() - t0)
    rollouts = {p.name: p.ip for p in cluster.wait_ready("rollout", timeout_s=max(left, 1))}
    started = time.monotonic() - t0
    expected = sorted(f"{ip}:50051" for ip in rollouts.values())

    # watch the run until ITERATIONS iterations after the learner lists both replicas, with both in
    # sync, or RUN_TIMEOUT_S (the first replica ready may feed the learner alone for a while)
    polls = []
    v_listed: int | None = None  # the learner's version when it first listed both
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            p = poll(learner.ip, rollouts)
            if p is not None:
                polls.append(p)
                if v_listed is None and sorted(p.registered) == expected:
                    v_listed = p.learner_version
                in_sync = all((v or 0) >= p.learner_version for v in p.rollout_versions.values())
                done = v_listed is not None and p.learner_version >= max(v_listed + ITERATIONS, ITERATIONS) and in_sync
                far = p.learner_version >= (v_listed or 0) + 4 * ITERATIONS  # enough to tell a replica is left behind
                if (done or far) and all_produced(rollouts):
                    break  # the learner trains ~2 iterations a second: a worker's first batch may take longer
            time.sleep(0.5)
        records = buffer.experience()
    finally:
        buffer.close()
    workers = {name: scrape(ip, 9091) for name, ip in rollouts.items()}
    ran = time.monotonic() - t0 - started
    last = polls[-1] if polls else None
    print(f"pods ready after {started:.0f}s; then {ran:.0f}s to the last poll: {last}")
    log = learner_log(cluster.workdir / "claims", learner.name)

    # both produce experience, each under its own id (its pod name): the workers' own metrics
    for name, metrics in workers.items():
        acked = replica_labels(metrics, "instructrl_rollout_prompts_acked_total")
        assert list(acked) == [name], f"the worker of pod {name} works as replica(s) {sorted(acked)}"
        put = metrics.get('instructrl_buffer_put_records_total{stream="experience"}', 0)
        assert put > 0, f"{name} wrote no experience"
    # the learner lists both replicas: two distinct ids, one address each
    seen = sorted({tuple(sorted(p.registered)) for p in polls})
    both = [p for p in polls if sorted(p.registered) == expected]
    assert both, f"the learner never listed both replicas {expected}; it listed {seen}"
    # the loop runs
    assert last.learner_version >= ITERATIONS, (
        f"the run stalled at policy_version {last.learner_version} (replicas at {last.rollout_versions}); "
        f"learner log: {[{k: r.get(k) for k in ('policy_version', 'stale_dropped', 'sync_replicas_ok')} for r in log]}")
    # after every broadcast that followed their registration, both report the learner's version
    v_both = both[0].learner_version
    behind = [p for p in polls if p.learner_version > v_both and
              any((v or 0) < p.learner_version for v in p.rollout_versions.values())]
    assert not behind, f"a replica missed a broadcast: {behind[:3]}"
    for rec in log:
        if rec["policy_version"] > v_both + 1 and "sync_replicas_ok" in rec:
            assert rec["sync_replicas_ok"] == 2, rec
    # and the learner trains on both replicas' experience (records stay in the stream until committed)
    by_sample = {r.sample_id: r.replica_id for r in records}
    trained = {by_sample.get(s) for rec in log for s in rec.get("sample_ids", [])}
    assert set(rollouts) <= trained, f"trained on records of {trained}"
