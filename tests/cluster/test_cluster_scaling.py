"""Scenarios 2, 3 and 5 of issue 13, in one run (they share its slow start), on
ci/cluster-values.yaml with a 2-rank learner (a StatefulSet of 2 pods, two hosts) and one
rollout replica at first:

5. the 2-rank learner trains and broadcasts (every phase below; its checkpoint holds both ranks);
2. rollout scaled 1 -> 3: the new pods join at the next sync (the learner lists all three, at
   its version);
3. one new pod's link cut as the learner enters a weight broadcast: the others get the learner's
   version (within one sync.timeout_s in most runs, see below), training goes on, nothing hangs;
   healed, the pod rejoins and catches up;
2. rollout scaled 3 -> 1: the removed pods unregister (preStop drain), so the next syncs cost
   no more than a few seconds; no prompt a removed pod held is left with it;
and then the producers stop (rollout -> 0), a checkpoint commits what was trained, and the
run is audited (accounting.py): nothing trained twice, every record accounted for.
"""
from __future__ import annotations

import ast
import json
import time

import pytest
import yaml
from accounting import audit
from scenario_support import (
    CLUSTER_VALUES,
    BundledRedis,
    demo_prompts,
    jsonl,
    learner_status,
    poll,
    rollout_status,
    save_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SYNC_TIMEOUT_S = 10  # sync.timeout_s: what a cut pod may cost one broadcast
START_TIMEOUT_S = 360  # every pod ready (vLLM, 2 DeepSpeed ranks) on 2 loaded cores
JOIN_TIMEOUT_S = 300  # two more rollout pods load vLLM, register, and get the weights
STEP_TIMEOUT_S = 180  # the learner trains a few more iterations
FEW_SECONDS = 5.0  # what a sync after the scale-down may take


def last_rank(lead, pods: dict[str, str]) -> str:
    """The pod holding the highest rank of the learner's current weight group (from its log)."""
    lines = [ln for ln in (lead.dir / "learner.log").read_text().splitlines() if "world size" in ln]
    first_rank = ast.literal_eval(lines[-1][lines[-1].index("{"):])  # {"ip:port": first rank}
    ip = max(first_rank, key=first_rank.get).split(":")[0]
    return next(name for name, pod_ip in pods.items() if pod_ip == ip)


def values() -> dict:
    v = yaml.safe_load(CLUSTER_VALUES.read_text())
    v["rollout"]["replicas"] = 1
    v["learner"]["ranks"] = 2
    v["learner"]["checkpoints"]["existingClaim"] = "instructrl-checkpoints"  # shared by the ranks (RWX)
    v["config"]["learner"]["sync"]["timeout_s"] = SYNC_TIMEOUT_S
    return v


def test_scale_out_cut_heal_scale_in_with_a_two_rank_learner(make_cluster, models_claim, prebuilt_ops, tmp_path):
    t0 = time.monotonic()
    checkpoints = tmp_path / "checkpoints-claim"
    checkpoints.mkdir()
    cluster = make_cluster(values(), claims={"instructrl-models": models_claim, "instructrl-checkpoints": checkpoints})
    (redis_pod,) = cluster.wait_ready("redis", timeout_s=90)
    buffer = BundledRedis(redis_pod.ip, cluster.secret("redis", "password"))
    buffer.enqueue(demo_prompts(64), epochs=1000)  # more than the run needs: ~2.5 tiny iterations a second
    learners = cluster.wait_ready("learner", timeout_s=START_TIMEOUT_S)
    assert sorted(p.name for p in learners) == ["rl-instructrl-learner-0", "rl-instructrl-learner-1"]
    lead = cluster.pod("rl-instructrl-learner-0")
    cluster.wait_ready("rollout", timeout_s=max(START_TIMEOUT_S - (time.monotonic() - t0), 1))
    phases = {"ready": time.monotonic() - t0}

    def rollouts() -> dict[str, str]:
        return {p.name: p.ip for p in cluster.pods_of("rollout")}

    def at_version(v: int, names=None):
        """A poll where the learner is at >= v and every (named) rollout reports the learner's version."""
        p = poll(lead.ip, {n: ip for n, ip in rollouts().items() if names is None or n in names})
        if p and p.learner_version >= v and all(x is not None and x >= p.learner_version
                                                 for x in p.rollout_versions.values()):
            return p
        return None

    def others_at(v: int, names=None):
        """The versions the named replicas report, once every one of them is at >= v."""
        versions = {n: getattr(rollout_status(ip), "policy_version", None) for n, ip in rollouts().items()
                    if n in names}
        return versions if all(x is not None and x >= v for x in versions.values()) else None

    try:
        # 5. the 2-rank learner trains and broadcasts to the first replica
        # (a learner pod is ready once it serves, before its models are loaded)
        cluster.wait_until(lambda: at_version(2), START_TIMEOUT_S - phases["ready"] + STEP_TIMEOUT_S,
                           "2 iterations with the replica in sync")

        # 2. scale 1 -> 3: the new pods join at the next sync
        t = time.monotonic()
        cluster.scale("rollout", 3)
        cluster.wait_ready("rollout", 3, timeout_s=JOIN_TIMEOUT_S)
        want = sorted(f"{ip}:50051" for ip in rollouts().values())
        joined = cluster.wait_until(
            lambda: (lambda p: p if p and sorted(p.registered) == want else None)(at_version(0)),
            JOIN_TIMEOUT_S - (time.monotonic() - t), f"the learner to list {want}, all at its version")
        phases["join"] = time.monotonic() - t
        print(f"joined at v{joined.learner_version}: {joined}")

        # 3. cut a pod's link as the learner enters a broadcast (it publishes the version to
        # the workers' admission in Redis just before it syncs; GetStatus only after). The pod cut is
        # the group's last rank: a leaf of gloo's broadcast tree whose relay is a healthy replica, the
        # case where that relay's own receive stalls too (the cut relay is covered by test_coordinator)
        victim = last_rank(lead, rollouts())
        others = [n for n in rollouts() if n != victim]
        v = buffer.pacing_version()
        cluster.wait_until(lambda: buffer.pacing_version() > v, STEP_TIMEOUT_S, "the next iteration", poll_s=0.02)
        cluster.cut(victim)
        t_cut, v_cut = time.monotonic(), v + 1
        got = cluster.wait_until(lambda: others_at(v_cut, others), SYNC_TIMEOUT_S + STEP_TIMEOUT_S,
                                 f"{others} at v{v_cut} while {victim} is cut", poll_s=0.1)
        phases["others_synced_after_cut"] = time.monotonic() - t_cut
        print(f"cut {victim} at v{v_cut}; the others report v{v_cut} {phases['others_synced_after_cut']:.1f}s later")
        # The learner finds the cut pod gone while it broadcasts (no GetStatus answer within a third
        # of timeout_s), abandons that broadcast and resends it to the others at once
        # (weight_sync/coordinator.py), within one sync.timeout_s (issue 13): ~5 s. It took 16-22 s in half
        # the runs while the relay, a pod scaled out seconds before, was compiling vLLM's logprob kernel
        # on its first batch (now at start-up: vllm_engine._warm_up) and so missed the resend's group.
        assert phases["others_synced_after_cut"] <= SYNC_TIMEOUT_S, (
            f"{others} got v{v_cut} {phases['others_synced_after_cut']:.0f}s after the cut (sync.timeout_s "
            f"{SYNC_TIMEOUT_S}): {got}")
        cluster.wait_until(lambda: at_version(v_cut + 2, others), STEP_TIMEOUT_S, "training to go on during the cut")
        status = learner_status(lead.ip)
        assert status is not None, f"the learner stopped answering while {victim} was cut"
        cut_entry = [r for r in status.replicas if r.replica_id == victim]
        assert not cut_entry or cut_entry[0].failed_syncs >= 1, f"the cut pod took a sync? {status}"
        hung = [n for n in others if rollout_status(rollouts()[n]) is None]
        assert not hung, f"{hung} stopped answering while {victim} was cut"
        cluster.heal(victim)
        t = time.monotonic()
        cluster.wait_until(lambda: (lambda p: p if p and f"{rollouts()[victim]}:50051" in p.registered else None)(
            at_version(0)), STEP_TIMEOUT_S, f"{victim} to rejoin and catch up after the heal")
        phases["catch_up_after_heal"] = time.monotonic() - t
        print(f"healed {victim}: listed and at the learner's version {phases['catch_up_after_heal']:.0f}s later")

        # 2. scale 3 -> 1: the removed pods leave the broadcast group before they go
        removed = [n for n in rollouts() if n != others[0]]
        held = buffer.pending_prompts(removed)
        before = learner_status(lead.ip)
        assert before is not None, "the learner stopped answering"
        v_down = before.policy_version  # every sync of a later version follows the SIGTERMs
        took = cluster.scale("rollout", 1)
        assert sorted(took) == sorted(removed), took
        (kept,) = rollouts()
        p = cluster.wait_until(lambda: at_version(v_down + 3), STEP_TIMEOUT_S, "3 iterations after the scale-down")
        assert p.registered == [f"{rollouts()[kept]}:50051"], f"still registered after the scale-down: {p.registered}"
        after = [r for r in jsonl(checkpoints / "metrics.jsonl") if r["policy_version"] > v_down
                 and "sync_seconds" in r]
        assert after, "no sync logged after the scale-down"
        slowest = max(r["sync_seconds"] for r in after)
        print(f"scale-down at v{v_down} took {took}; syncs after it: "
              f"{[(r['policy_version'], round(r['sync_seconds'], 2), r['sync_replicas_failed']) for r in after]}")
        assert slowest <= FEW_SECONDS, f"a sync after the scale-down took {slowest:.1f}s: {after}"
        assert all(r["sync_replicas_failed"] == 0 for r in after), after
        cluster.wait_until(lambda: not buffer.pending_prompts(removed), 60,
                           f"the {len(held)} prompts the removed pods held to be re-delivered")

        # the producers stop; a checkpoint commits what was trained; the audit
        cluster.scale("rollout", 0)
        saved = save_checkpoint(lead.ip)
        saved_dir = checkpoints / saved.rstrip("/").rsplit("/", 1)[-1]
        state = json.loads((saved_dir / "state.json").read_text())
        assert state["world_size"] == 2 and (saved_dir / "rng-rank1.json").exists(), (saved, state)
        acc = audit(buffer.client, buffer.run_id, jsonl(checkpoints / "metrics.jsonl"))
    finally:
        buffer.close()
    print(f"phases (s): { {k: round(x) for k, x in phases.items()} }; scale-down took {took}; "
          f"slowest sync after it {slowest:.2f}s; prompts held by removed pods at SIGTERM {len(held)}")
    print(acc.summary("scenarios 2+3+5 (1 -> 3 -> 1 rollout, 1 cut + heal, 2-rank learner)"))
    acc.check()
