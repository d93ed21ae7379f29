"""Scenario 4 of issue 13: SIGKILL each pod kind in turn mid-run, and the run still reaches
its last iteration with every record accounted for.

ci/cluster-values.yaml with one rollout replica, a checkpoint every 2 iterations and a last
iteration. In turn, each after the learner has trained since the previous kill: the rollout
pod's worker container, its rollout container, the reward pod, the reference pod, the learner
(it resumes from its checkpoint and trains the iterations after it again), the bundled Redis
(its AOF on its claim). The kubelet restarts each in place. Then: the run reaches
max_iterations, and the audit (accounting.py) finds nothing trained twice in the final
lineage and every record written trained, dropped with a reason, or unread.
"""
from __future__ import annotations

import time

import pytest
import yaml
from accounting import audit
from scenario_support import CLUSTER_VALUES, BundledRedis, demo_prompts, learner_log, learner_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ITERATIONS = 24
# The tiny models train a few iterations a second: prompts are fed one chunk per phase, 3
# iterations' worth (batch 16 = 8 prompts x n 2), so every kill lands mid-run and the run cannot
# end before the last one (at most 3 + 3 per kill iterations before the final feed)
CHUNK = 24
START_TIMEOUT_S = 300
RECOVER_TIMEOUT_S = 300  # a restarted vLLM or DeepSpeed process loads again on 2 loaded cores
# (pod workload, container or None = every container of the pod)
KILLS = [("rollout", "worker"), ("rollout", "rollout"), ("reward", None), ("reference", None),
         ("learner", None), ("redis", None)]


def values() -> dict:
    v = yaml.safe_load(CLUSTER_VALUES.read_text())
    v["rollout"]["replicas"] = 1
    learner = v["config"]["learner"]
    learner["ppo"]["max_iterations"] = ITERATIONS
    learner["checkpoint"]["every"] = 2
    return v


def test_sigkill_each_pod_kind_in_turn_and_the_run_finishes(make_cluster, models_claim, prebuilt_ops):
    t0 = time.monotonic()
    cluster = make_cluster(values(), claims={"instructrl-models": models_claim})
    (redis_pod,) = cluster.wait_ready("redis", timeout_s=90)
    buffer = BundledRedis(redis_pod.ip, cluster.secret("redis", "password"))
    prompts = demo_prompts(CHUNK * (len(KILLS) + 1) + 8 * ITERATIONS)
    chunks = [prompts[i:i + CHUNK] for i in range(0, CHUNK * (len(KILLS) + 1), CHUNK)]

    def feed(batch: list[dict]) -> None:  # through a Redis that may be coming back from its kill
        cluster.wait_until(lambda: _try(lambda: buffer.enqueue(batch, epochs=1)), 120, "Redis to take prompts")

    feed(chunks[0])
    (learner,) = cluster.wait_ready("learner", timeout_s=START_TIMEOUT_S)
    cluster.wait_ready("rollout", timeout_s=max(START_TIMEOUT_S - (time.monotonic() - t0), 1))
    ready = time.monotonic() - t0

    def version() -> int:
        s = learner_status(learner.ip)
        return s.policy_version if s else -1

    kills = []
    try:
        cluster.wait_until(lambda: (lambda x: x if x >= 1 else 0)(version()), START_TIMEOUT_S - ready
                           + RECOVER_TIMEOUT_S, "the learner to train its first iteration")
        for (workload, container), chunk in zip(KILLS, chunks[1:], strict=True):
            what = f"{workload}/{container or '*'}"
            v_kill = version()
            assert v_kill < ITERATIONS, f"the run ended (v{v_kill}) before the {what} kill"
            (pod,) = cluster.pods_of(workload)
            t = time.monotonic()
            cluster.kill(pod.name, container)
            feed(chunk)
            # an iteration after the kill: the run goes on (a learner comes back at its checkpoint)
            back = cluster.wait_until(lambda v=v_kill: (lambda x: x if x > v else 0)(version()), RECOVER_TIMEOUT_S,
                                      f"an iteration after SIGKILL of {what} at v{v_kill}")
            kills.append((what, v_kill, back, round(time.monotonic() - t)))
        feed(prompts[CHUNK * (len(KILLS) + 1):])
        cluster.wait_until(lambda: (lambda s: s if s and s.finished else None)(learner_status(learner.ip)),
                           RECOVER_TIMEOUT_S, f"the run to reach its last iteration ({ITERATIONS})")
        log = learner_log(cluster.workdir / "claims", learner.name)
        acc = audit(buffer.client, buffer.run_id, log)
    finally:
        buffer.close()
    print(f"pods ready after {ready:.0f}s; kills (what, at version, next version, seconds to it): {kills}")
    print(acc.summary(f"scenario 4 ({len(kills)} SIGKILLs: {', '.join(k[0] for k in kills)})"))
    assert acc.iterations == ITERATIONS, acc
    acc.check()


def _try(f) -> bool:
    try:
        f()
        return True
    except Exception as e:  # noqa: BLE001 - Redis restarting: ConnectionError, BusyLoadingError
        print(f"enqueue: {e!r}")
        return False
