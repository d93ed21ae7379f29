"""Several learner ranks per pod (issue 15 item 4): `instructrl serve learner` in a pod of the chart
(NODE_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR/PORT) starts its local ranks.

The end-to-end test plays two pods of two local ranks each on gloo (world 4, ZeRO-3): the rank
numbering, the rendezvous across "pods", the ZeRO-3 gather of every parameter for the broadcast,
and that the weights a replica receives are the learner's after the iteration (its checkpoint).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from fake_replica import FakeReplica
from learner_testkit import REPO, build_tiny, child_env, config, free_port, random_records, write_config
from safetensors.torch import load_file

from instructrl.buffer import ExperienceBuffer
from instructrl.learner import local_ranks
from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import learner_pb2, learner_pb2_grpc

POD = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_rank_envs_number_ranks_like_torchrun():
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in local_ranks.rank_envs({**POD, "NODE_RANK": "0"})] == [
        ("0", "0"), ("1", "1")]
    pod1 = local_ranks.rank_envs({**POD, "NODE_RANK": "1"})
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in pod1] == [
        ("2", "0", "4", "2"), ("3", "1", "4", "2")]
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == "29500" for e in pod1)  # rendezvous as is
    one = local_ranks.rank_envs({"NODE_RANK": "3", "WORLD_SIZE": "4"})  # one rank per pod
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in one] == [("3", "0")]
    assert local_ranks.wanted({"NODE_RANK": "0"}) and not local_ranks.wanted({"NODE_RANK": "0", "RANK": "0"})


@pytest.mark.parametrize("env,message", [
    ({"NODE_RANK": "2"}, "NODE_RANK=2: 2 pod(s) of 2 rank(s)"),
    ({"NODE_RANK": "0", "WORLD_SIZE": "3"}, "WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
    ({"NODE_RANK": "x"}, "NODE_RANK='x': an integer"),
    ({"NODE_RANK": "0", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0: must be >= 1"),
])
def test_rank_envs_name_the_variable_that_does_not_fit(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        local_ranks.rank_envs({**POD, **env})


def _children(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_a_failing_rank_stops_the_pods_other_ranks(tmp_path):
    """Rank 1 fails at once; rank 0 would wait for it forever (a collective): it is stopped."""
    script = ("import os, sys, time\n"
              "if os.environ['LOCAL_RANK'] == '1': sys.exit(3)\n"
              "time.sleep(120)\n")
    t0 = time.monotonic()
    code = local_ranks.supervise(_children(script), local_ranks.rank_envs({**POD, "NODE_RANK": "0"}),
                                 kill_after_s=2)
    assert code == 3 and time.monotonic() - t0 < 30


def test_sigterm_reaches_every_local_rank(tmp_path):
    """The kubelet's SIGTERM goes to the pod's launcher; every rank gets it and stops cleanly."""
    script = ("import os, signal, sys, time, pathlib\n"
              f"d = pathlib.Path({str(tmp_path)!r})\n"
              "signal.signal(signal.SIGTERM, lambda *_: (d.joinpath('stopped-' + os.environ['RANK']).touch(),"
              " sys.exit(0)))\n"
              "d.joinpath('ready-' + os.environ['RANK']).touch()\n"
              "time.sleep(120)\n")
    launcher = ("import sys\nfrom instructrl.learner import local_ranks\n"
                f"sys.exit(local_ranks.supervise({_children(script)!r}, local_ranks.rank_envs("
                f"{{**{POD!r}, 'NODE_RANK': '1'}})))\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=child_env())
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-2", "stopped-3"]


def test_pod_variables_that_do_not_fit_are_a_clear_cli_error(tmp_path):
    cfg = write_config(config(tmp_path, "/nonexistent", "redis://127.0.0.1:1", "x"), tmp_path / "learner.yaml")
    env = {**child_env(), **POD, "NODE_RANK": "5"}
    res = subprocess.run([sys.executable, "-m", "instructrl.cli", "serve", "learner", "--config", str(cfg)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "NODE_RANK=5" in res.stderr, res.stderr[-2000:]


def _start_pod(node: int, cfg_file, log_file, master_port: int) -> subprocess.Popen:
    env = {**child_env(), **POD, "NODE_RANK": str(node), "MASTER_PORT": str(master_port)}
    out = open(log_file, "ab")
    return subprocess.Popen([sys.executable, "-m", "instructrl.cli", "serve", "learner", "--config", str(cfg_file)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


@pytest.mark.slow
def test_two_pods_of_two_ranks_train_and_broadcast_the_zero3_weights(tmp_path, redis_url, run_id):
    model_dir = build_tiny(tmp_path / "sft")
    cfg = config(tmp_path, model_dir, redis_url, run_id, batch_size=8, minibatch_size=4, micro_batch_size=1,
                 epochs=1, max_iterations=1, actor_lr=1e-2, critic_lr=1e-2)
    cfg.deepspeed.zero_stage = 3
    cfg.checkpoint.save_hf = True
    cfg.sync.enabled, cfg.sync.backend, cfg.sync.bucket_mb, cfg.sync.timeout_s = True, "gloo", 1, 60
    cfg.server.port = free_port()
    cfg_file = write_config(cfg, tmp_path / "learner.yaml")
    replica = FakeReplica()
    master_port = free_port()
    logs = [tmp_path / f"pod-{n}.log" for n in (0, 1)]
    pods = [_start_pod(n, cfg_file, logs[n], master_port) for n in (0, 1)]

    def tail() -> str:
        return "\n".join(f"--- pod {n}\n{p.read_text()[-3000:]}" for n, p in enumerate(logs))

    try:
        stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(ClientConfig(address=f"127.0.0.1:{cfg.server.port}")))
        deadline = time.monotonic() + 240
        while True:
            assert all(p.poll() is None for p in pods) and time.monotonic() < deadline, tail()
            try:
                stub.GetStatus(learner_pb2.GetLearnerStatusRequest(), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.5)
        assert stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(
            replica_id="replica-0", address=replica.address), timeout=10).accepted
        with ExperienceBuffer.open(cfg.buffer) as buf:
            buf.put(random_records(8, vocab=300, seed=3))
        assert [p.wait(300) for p in pods] == [0, 0], tail()
    finally:
        for p in pods:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        replica.kill()
    text = "".join(p.read_text() for p in logs)
    assert all(f"[rank {r}]" in text for r in range(4)), tail()
    trained = load_file(str(tmp_path / "ckpt" / "iteration-00000001" / "actor_hf" / "model.safetensors"))
    initial = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert replica.version == 1 and set(replica.weights) == set(trained), (replica.version, sorted(replica.weights))
    for name, t in trained.items():
        torch.testing.assert_close(replica.weights[name], t, rtol=0, atol=0, msg=name)
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-3, "the iteration moved weights"
