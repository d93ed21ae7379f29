"""What the RLHF scenarios on the bed share: the models claim, prompts, and the observers.

Everything here talks to the pods the way an operator would, from this machine over the pods'
kubelet links: the learner's and the rollouts' GetStatus, the bundled Redis (prompts in as a
prompt-loading Job would put them; the experience stream read, never consumed), and the
learner's metrics log on its checkpoints claim.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from instructrl.v1 import experience_pb2, learner_pb2, learner_pb2_grpc, rollout_pb2, rollout_pb2_grpc

GRPC_PORT = 50051
CLUSTER_VALUES = Path(__file__).resolve().parents[2] / "helm" / "instructrl" / "ci" / "cluster-values.yaml"


def build_models(claim: Path) -> Path:
    """sft/ (a tiny Llama) and reward/ (a tiny RM with the same tokenizer) in the models claim,
    built as the demo and the launcher tests build theirs: from configs, nothing downloaded."""
    from instructrl.demo.task import tokenizer_corpus
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama
    from instructrl.reward.tiny import build_tiny_reward_model

    cfg = TinyModelConfig(hidden_size=64, num_heads=1, num_layers=1, max_position_embeddings=256)
    texts = tokenizer_corpus()
    _, sft_tok = build_tiny_llama(claim / "sft", cfg, texts)
    _, rm_tok = build_tiny_reward_model(claim / "reward", cfg, texts)
    assert sft_tok.get_vocab() == rm_tok.get_vocab(), "policy and reward model must share token ids"
    return claim


def demo_prompts(n: int) -> list[dict]:
    from instructrl.demo.task import answer, make_prompts
    return [{"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": answer(p)}}
            for i, p in enumerate(make_prompts(n, seed=0))]


class BundledRedis:
    """The chart's Redis pod, seen from this machine."""

    def __init__(self, ip: str, password: str, run_id: str = "default"):
        from instructrl.buffer.config import Keys
        self.url = f"redis://:{password}@{ip}:6379/0"
        self.run_id = run_id
        # retried across a restart of the Redis pod (scenario 4 kills it)
        self.client = redis.Redis(host=ip, port=6379, password=password, socket_timeout=10, socket_connect_timeout=5,
                                  retry=Retry(ExponentialBackoff(cap=2.0), 30),
                                  retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
        self.keys = Keys.for_run(run_id)
        self.experience_key = self.keys.experience

    def enqueue(self, prompts: list[dict], epochs: int) -> int:
        from instructrl.launcher.run import enqueue
        return enqueue(self.url, self.run_id, prompts, epochs)

    def experience(self) -> list[experience_pb2.Experience]:
        """The records in the experience stream now (read without a group, so nothing is consumed).
        A record stays there until the learner commits it at a checkpoint or drops it (stale,
        duplicate, poison): every record trained since the last checkpoint is among them."""
        return [experience_pb2.Experience.FromString(fields[b"r"])
                for _, fields in self.client.xrange(self.experience_key) if b"r" in fields]

    def pacing_version(self) -> int:
        """The learner's version as published to the workers' admission rule (docs/pacing.md):
        written after each iteration, before its weight broadcast."""
        v = self.client.hget(self.keys.pacing, "version")
        return int(v) if v is not None else -1

    def pending_prompts(self, consumers: list[str]) -> dict[str, list]:
        """Prompt entries pending (claimed, not acked) at each of these consumers (rollout pods)."""
        out = {}
        for c in consumers:
            ids = [p["message_id"] for p in self.client.xpending_range(
                self.keys.prompts, "rollout", "-", "+", 10_000, consumername=c)]
            if ids:
                out[c] = ids
        return out

    def close(self) -> None:
        self.client.close()


def scrape(ip: str, port: int) -> dict[str, float]:
    """A pod's Prometheus /metrics as {'name{labels}': value} (samples of instructrl_* only)."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("instructrl_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def replica_labels(metrics: dict[str, float], family: str) -> dict[str, float]:
    """{replica label: value} of one metric family, e.g. instructrl_rollout_prompts_acked_total."""
    found = {}
    for key, value in metrics.items():
        m = re.fullmatch(rf'{family}\{{.*replica="([^"]*)".*\}}', key)
        if m:
            found[m.group(1)] = value
    return found


def learner_status(ip: str) -> learner_pb2.LearnerStatus | None:
    with grpc.insecure_channel(f"{ip}:{GRPC_PORT}") as ch:
        try:
            return learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(learner_pb2.GetLearnerStatusRequest(), timeout=5)
        except grpc.RpcError:
            return None


def rollout_status(ip: str) -> rollout_pb2.RolloutStatus | None:
    with grpc.insecure_channel(f"{ip}:{GRPC_PORT}") as ch:
        try:
            return rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.GetRolloutStatusRequest(), timeout=5)
        except grpc.RpcError:
            return None


@dataclasses.dataclass
class Poll:
    """One look at the run: the learner's status and each rollout pod's policy_version."""

    t: float
    learner_version: int
    registered: list[str]                 # the learner's registered replicas (addresses)
    rollout_versions: dict[str, int | None]  # pod name -> its GetStatus policy_version


def poll(learner_ip: str, rollouts: dict[str, str]) -> Poll | None:
    """`rollouts`: pod name -> ip. The learner is asked first: it publishes a version only after
    its broadcast, so a replica that took the broadcast already reports at least that version."""
    s = learner_status(learner_ip)
    if s is None:
        return None
    versions = {}
    for name, ip in rollouts.items():
        r = rollout_status(ip)
        versions[name] = r.policy_version if r else None
    return Poll(time.monotonic(), s.policy_version, [r.address for r in s.replicas], versions)


def learner_log(claims_dir: Path, learner_pod: str, mount: str = "checkpoints") -> list[dict]:
    """The learner's metrics.jsonl from its checkpoints claim (volumeClaimTemplate)."""
    return jsonl(claims_dir / f"{mount}-{learner_pod}" / "metrics.jsonl")


def jsonl(path: Path) -> list[dict]:
    """A JSONL log's lines (a last line cut by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def save_checkpoint(ip: str, timeout_s: float = 300) -> str:
    """SaveCheckpoint (a regular one: the learner then commits what it trained); its path in the pod."""
    with grpc.insecure_channel(f"{ip}:{GRPC_PORT}") as ch:
        return learner_pb2_grpc.LearnerServiceStub(ch).SaveCheckpoint(
            learner_pb2.SaveCheckpointRequest(), timeout=timeout_s).path
