"""Helpers of the learner tests: a tiny model, an in-process "rollout" (multinomial sampling
from the actor), Experience records, configs, and learner subprocesses.

Notation: B records, P prompt tokens, T response tokens.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import torch

from instructrl.buffer import BufferConfig, PacingConfig, RedisConfig
from instructrl.codec import logprobs, tokens
from instructrl.learner.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    PPOConfig,
    SyncConfig,
)
from instructrl.models.tiny import TinyModelConfig, build_tiny_llama
from instructrl.serving.server import ServerConfig
from instructrl.v1 import experience_pb2

FIRST_TOKEN = 3  # ids 0..2 are pad, bos, eos
REPO = pathlib.Path(__file__).resolve().parents[2]


def build_tiny(out_dir: pathlib.Path, seed: int = 0) -> str:
    """A 2-layer, 64-wide Llama with a ~300-token BPE vocabulary; returns its directory."""
    build_tiny_llama(out_dir, TinyModelConfig(vocab_size=300, hidden_size=64, num_heads=1, num_layers=2,
                                              intermediate_size=128, seed=seed))
    return str(out_dir)


def random_prompts(n: int, length: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    return torch.randint(FIRST_TOKEN, vocab, (n, length), generator=gen).tolist()


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new: int, gen: torch.Generator,
           temperature: float = 1.0) -> tuple[list[list[int]], list[list[float]]]:
    """Multinomial sampling of `max_new` tokens after equal-length `prompts`; (responses, log-probs)."""
    ids = torch.tensor(prompts, dtype=torch.long)  # (B, P)
    tokens, logps = [], []
    for _ in range(max_new):
        logits = model(input_ids=ids).logits[:, -1].float() / temperature  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=gen)  # (B, 1)
        tokens.append(nxt)
        logps.append(logp.gather(1, nxt))
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(tokens, 1).tolist(), torch.cat(logps, 1).tolist()


@torch.no_grad()
def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    """log p(response_t | prefix) under `model` (the reference's job), equal lengths."""
    ids = torch.cat([torch.tensor(prompts), torch.tensor(responses)], dim=1)
    P = len(prompts[0])
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # (B, L, V)
    return logp[:, P - 1:-1].gather(2, ids[:, P:].unsqueeze(-1)).squeeze(-1).tolist()


def experience(sample_id: str, prompt: list[int], response: list[int], sampling_lp: list[float],
               ref_lp: list[float], score: float, version: int) -> experience_pb2.Experience:
    return experience_pb2.Experience(
        sample_id=sample_id, prompt_id=sample_id.split("/")[0],
        prompt_token_ids=tokens(prompt), response_token_ids=tokens(response),
        finish_reason="length", sampling_logprobs=logprobs(sampling_lp),
        policy_version=version, ref_logprobs=logprobs(ref_lp),
        score=score, raw_score=score)


def random_records(n: int, vocab: int, seed: int, prefix: str = "r", version: int = 0):
    """`n` records with random tokens, variable lengths, log-probs and scores (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, T = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        prompt = torch.randint(FIRST_TOKEN, vocab, (P,), generator=g).tolist()
        response = torch.randint(FIRST_TOKEN, vocab, (T,), generator=g).tolist()
        lp = (-torch.rand(T, generator=g) * 5).tolist()
        ref = (-torch.rand(T, generator=g) * 5).tolist()
        out.append(experience(f"{prefix}{i}/e0/s0", prompt, response, lp, ref,
                              float(torch.randn(1, generator=g)), version))
    return out


def config(tmp: pathlib.Path, model_dir: str, redis_url: str, run_id: str, **ppo) -> LearnerConfig:
    """A small learner config: no gRPC server, no weight sync, checkpoints under tmp."""
    return LearnerConfig(
        model=ModelConfig(actor_path=model_dir),
        ppo=PPOConfig(**{"batch_size": 8, "minibatch_size": 4, "micro_batch_size": 2, "epochs": 1, **ppo}),
        deepspeed=DeepSpeedConfig(zero_stage=0, torch_threads=1),
        buffer=BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=200, claim_idle_ms=1000),
        pacing=PacingConfig(max_policy_lag=None),
        sync=SyncConfig(enabled=False, master_port=0),
        checkpoint=CheckpointConfig(dir=str(tmp / "ckpt"), every=1000, save_hf=False),
        server=ServerConfig(port=-1, metrics_port=-1),
        logging=LoggingConfig(jsonl=str(tmp / "metrics.jsonl")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a learner subprocess: one thread, no inherited torch.distributed vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def start_learner(config_file: pathlib.Path, log_file: pathlib.Path, *overrides: str,
                  nproc: int = 1) -> subprocess.Popen:
    """`python -m instructrl.learner.server --config ...` (through torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "instructrl.learner.server"]
    else:
        cmd = [sys.executable, "-m", "instructrl.learner.server"]
    out = open(log_file, "ab")
    return subprocess.Popen(cmd + ["--config", str(config_file), *overrides], stdout=out,
                            stderr=subprocess.STDOUT, env=child_env(), cwd=REPO, start_new_session=True)


def write_config(cfg: LearnerConfig, path: pathlib.Path) -> pathlib.Path:
    """Dump `cfg` as the YAML file `instructrl serve learner --config` reads."""
    import yaml

    from instructrl.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def read_jsonl(path: pathlib.Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


