"""The LearnerService over real gRPC, and an idle learner honouring SaveCheckpoint and stop; PPO-ptx."""
from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
from learner_testkit import build_tiny, config, free_port, random_records

from instructrl.buffer import ExperienceBuffer
from instructrl.learner.control import Control
from instructrl.learner.loop import train
from instructrl.learner.server import ServerThread
from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.serving.server import ServerConfig
from instructrl.v1 import learner_pb2, learner_pb2_grpc


def test_learner_service_rpcs():
    control = Control()
    server = ServerThread(ServerConfig(port=0, metrics_port=-1), control).start()
    try:
        with sync_channel(ClientConfig(address=f"127.0.0.1:{server.port}")) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            control.publish(policy_version=7, optimizer_step=70, kl_coef=0.02)
            r = stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id="a", address="h:1"))
            assert r.accepted and r.policy_version == 7
            stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id="b", address="h:2"))
            stub.UnregisterRollout(learner_pb2.UnregisterRolloutRequest(replica_id="a"))
            s = stub.GetStatus(learner_pb2.GetLearnerStatusRequest())
            assert (s.policy_version, s.optimizer_step) == (7, 70)
            assert [(r.replica_id, r.address, r.policy_version) for r in s.replicas] == [("b", "h:2", -1)]
            assert control.replicas() == {"b": "h:2"}
            with pytest.raises(grpc.RpcError) as e:
                stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id="", address="h:3"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            def loop_side():  # what the training loop does at its next iteration boundary
                while not control.save_requested():
                    time.sleep(0.01)
                path, fut = control.take_save_request()
                fut.set_result((path or "/ckpt/iteration-00000007", 70))
            t = threading.Thread(target=loop_side)
            t.start()
            resp = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(), timeout=10)
            t.join()
            assert (resp.path, resp.optimizer_step) == ("/ckpt/iteration-00000007", 70)
            with pytest.raises(grpc.RpcError) as e:  # nobody answers: the deadline, not a hang
                stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(path="x"), timeout=0.5)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.stop(0)


def test_idle_learner_saves_on_request_then_stops(tmp_path, redis_url, run_id):
    """No data: a checkpoint request and a stop still get through the wait for records."""
    cfg = config(tmp_path, build_tiny(tmp_path / "sft"), redis_url, run_id)
    control = Control(cfg.checkpoint.dir)
    fut = control.request_save("manual")  # a name under checkpoint.dir
    result = {}
    t = threading.Thread(target=lambda: result.update(status=train(cfg, control=control)))
    t.start()
    path, optimizer_step = fut.result(timeout=120)
    assert path == str(tmp_path / "ckpt" / "manual") and optimizer_step == 0
    assert json.loads((tmp_path / "ckpt" / "manual" / "state.json").read_text())["policy_version"] == 0
    control.stop.set()
    t.join(60)
    assert not t.is_alive() and result["status"].policy_version == 0
    assert os.path.exists(tmp_path / "ckpt" / "iteration-00000000" / "state.json")  # the final checkpoint


def test_ppo_ptx_trains_the_pretraining_term(tmp_path, redis_url, run_id):
    data = tmp_path / "pretrain.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) for _ in range(8)))
    cfg = config(tmp_path, build_tiny(tmp_path / "sft"), redis_url, run_id, batch_size=4, minibatch_size=4,
                 micro_batch_size=2, epochs=4, max_iterations=3, actor_lr=3e-3, ptx_coef=1.0, ptx_data=str(data),
                 ptx_batch_size=2)
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(random_records(12, vocab=300, seed=5))
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ptx = [x["ptx_loss"] for x in lines]
    assert all(p is not None for p in ptx) and ptx[-1] < ptx[0] - 0.5, ptx
    state = json.loads((tmp_path / "ckpt" / "iteration-00000003" / "state.json").read_text())
    assert state["ptx"]["position"] == 3 * 4 * 2  # iterations x epochs x micro-batches


def test_every_learner_metric_of_the_catalogue_is_exported():
    """docs/metrics.md is the contract: each name of its Learner table is served."""
    import pathlib
    import re

    from prometheus_client import REGISTRY, generate_latest

    import instructrl.learner.metrics  # noqa: F401 - declares the metrics

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    table = doc.split("## Learner", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `(instructrl_learner_\w+)`", table, flags=re.M)
    assert len(names) >= 20
    text = generate_latest(REGISTRY).decode()
    missing = [n for n in names if not re.search(rf"^# TYPE {n} ", text, flags=re.M)
               and not re.search(rf"^# TYPE {n.removesuffix('_total')} counter", text, flags=re.M)]
    assert not missing, missing


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_under_zero_continues_the_same_curve(tmp_path, redis_url, run_id, zero_stage):
    """ZeRO-2/3 checkpoints (optimizer shards included): 1 step + resume + 1 step = 2 steps straight."""
    model_dir = build_tiny(tmp_path / "sft")
    records = random_records(8, vocab=300, seed=6)

    def cfg_for(name: str, max_iterations: int):
        (tmp_path / name).mkdir(exist_ok=True)
        cfg = config(tmp_path / name, model_dir, redis_url, f"{run_id}-{name}", batch_size=4, minibatch_size=2,
                     micro_batch_size=2, max_iterations=max_iterations, actor_lr=1e-2, critic_lr=1e-2)
        cfg.deepspeed.zero_stage = zero_stage
        return cfg

    for name in ("straight", "resumed"):
        with ExperienceBuffer.open(cfg_for(name, 0).buffer) as buf:
            buf.put(records)
    train(cfg_for("straight", 2))
    assert train(cfg_for("resumed", 1)).policy_version == 1
    status = train(cfg_for("resumed", 2))
    assert (status.policy_version, status.samples_trained, status.optimizer_step) == (2, 8, 4)
    assert sorted(os.listdir(tmp_path / "resumed" / "ckpt")) == ["iteration-00000001", "iteration-00000002"]
    straight, resumed = (json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1])
                         for n in ("straight", "resumed"))
    for key in ("policy_loss", "value_loss", "approx_kl", "reward_mean", "entropy"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key


def test_record_sync_evicts_after_consecutive_failures():
    control = Control()
    control.register("a", "h:1")
    control.register("b", "h:2")
    assert control.record_sync(["h:1"], ["h:2"], evict_after=2, policy_version=3) == []
    assert control.record_sync(["h:2"], [], evict_after=2, policy_version=3) == []        # a success clears b's count
    assert control.record_sync([], ["h:1", "h:2"], evict_after=2, policy_version=3) == []
    assert control.record_sync(["h:1"], ["h:2"], evict_after=2, policy_version=3) == ["b"]  # two in a row
    assert control.replicas() == {"a": "h:1"}
    control.register("b", "h:2")                                        # it came back: a clean record
    assert control.record_sync(["h:1"], ["h:2"], evict_after=2, policy_version=3) == []
    control.register("a", "h:9")                                        # moved: the old count is gone
    assert control.record_sync([], ["h:9", "h:2"], evict_after=0, policy_version=3) == []  # 0 never evicts
    assert control.replicas() == {"a": "h:9", "b": "h:2"}


def test_a_replica_behind_the_learner_asks_for_a_catch_up_sync():
    control = Control()
    control.publish(policy_version=4)
    control.register("a", "h:1", policy_version=4)      # up to date: nothing to do
    assert not control.take_catch_up()
    control.register("b", "h:2", policy_version=0)      # a restarted replica at the SFT weights
    assert control.catch_up_requested() and control.take_catch_up() and not control.take_catch_up()
    control.record_sync(["h:1", "h:2"], [], evict_after=3, policy_version=4)
    assert {r: s.policy_version for r, s in control.replica_states().items()} == {"a": 4, "b": 4}
    control.register("b", "h:2", policy_version=4)      # its periodic re-registration: in step
    assert not control.take_catch_up()
    control.register("a", "h:1", policy_version=6)      # ahead: another lineage (the learner resumed)
    assert control.take_catch_up()
    control.register("c", "h:3")                        # version unknown (-1): new, so caught up
    assert control.take_catch_up()


def test_learner_forgets_a_dead_replica_after_failed_syncs(tmp_path, redis_url, run_id):
    """A real learner and weight-sync coordinator; the replica's port refuses connections."""
    cfg = config(tmp_path, build_tiny(tmp_path / "sft"), redis_url, run_id, batch_size=4, minibatch_size=4,
                 micro_batch_size=2, max_iterations=4)
    cfg.sync.enabled, cfg.sync.backend, cfg.sync.master_port, cfg.sync.timeout_s = True, "gloo", 0, 10
    cfg.sync.evict_after_failures = 3
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(random_records(16, vocab=300, seed=7))
    control = Control()
    control.register("gone", f"127.0.0.1:{free_port()}", policy_version=0)  # nothing listens there
    status = train(cfg, control=control)
    assert status.policy_version == 4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # probed and reported 3 times, then forgotten: with no replica left the 4th step syncs nothing
    assert [x.get("sync_replicas_failed") for x in lines] == [1, 1, 1, None], lines
    assert control.replicas() == {}


def test_save_checkpoint_and_register_rollout_refuse_what_they_must(tmp_path):
    """SaveCheckpoint writes under checkpoint.dir only; RegisterRollout takes host:port addresses
    that register_allow allows, and only from callers with the token (issue 14 item 5)."""
    control = Control(str(tmp_path / "ckpt"), ["peer", "10.1.0.0/16", "*.ns.svc.cluster.local"])
    server = ServerThread(ServerConfig(port=0, metrics_port=-1, token="t0ken"), control).start()
    bad = grpc.StatusCode.INVALID_ARGUMENT
    try:
        with sync_channel(ClientConfig(address=f"127.0.0.1:{server.port}", token="t0ken")) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            for path in ("/etc/cron.d/x", "../x", "a/../../x", "a/b", "..", ".", "iteration-00000009", "x\x00y"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(path=path), timeout=5)
                assert e.value.code() == bad, path
            assert not control.save_requested()  # nothing reached the loop
            for address, code in (("h", bad), ("h:0", bad), ("h:65536", bad), ("h:x", bad), ("a b:1", bad),
                                  (":50051", bad), ("[zz]:1", bad), ("http://h:1", bad),
                                  ("10.2.0.1:50051", grpc.StatusCode.PERMISSION_DENIED),
                                  ("evil.example.com:50051", grpc.StatusCode.PERMISSION_DENIED),
                                  ("rollout-0.other.svc.cluster.local:50051", grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.RpcError) as e:
                    stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id="r", address=address))
                assert e.value.code() == code, address
            assert control.replicas() == {}
            for ok in ("127.0.0.1:50061", "10.1.2.3:50061", "rollout-0.rollout.ns.svc.cluster.local:50061"):
                assert stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id=ok, address=ok)).accepted
            assert sorted(control.replicas()) == sorted(["127.0.0.1:50061", "10.1.2.3:50061",
                                                         "rollout-0.rollout.ns.svc.cluster.local:50061"])
        for token in ("", "wrong"):  # the token guards RegisterRollout like every RPC
            with sync_channel(ClientConfig(address=f"127.0.0.1:{server.port}", token=token)) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    learner_pb2_grpc.LearnerServiceStub(ch).RegisterRollout(
                        learner_pb2.RegisterRolloutRequest(replica_id="x", address="127.0.0.1:1"))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x" not in control.replicas()
    finally:
        server.stop(0)
