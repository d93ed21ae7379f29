"""Request validation and configuration of the rollout service (no vLLM, no sockets)."""
from __future__ import annotations

import pytest

from instructrl.config import ConfigError, load
from instructrl.rollout.client import sampling_message
from instructrl.rollout.config import RolloutConfig
from instructrl.rollout.domain import Sampling, check_prompt_ids, resolve_sampling
from instructrl.rollout.server import _sampling
from instructrl.rollout.server import main as serve_main
from instructrl.rollout.worker import WorkerConfig
from instructrl.serving.errors import InvalidArgument

LIMITS = dict(max_n=8, max_model_len=256, default_max_tokens=32)


def test_proto_defaults_are_resolved():
    s = resolve_sampling(Sampling(n=0, temperature=0.0, top_p=0.0, top_k=-1, max_tokens=0), **LIMITS)
    assert (s.n, s.temperature, s.top_p, s.top_k, s.max_tokens) == (1, 0.0, 1.0, 0, 32)


@pytest.mark.parametrize("bad", [
    Sampling(n=9), Sampling(n=-1), Sampling(temperature=-0.1), Sampling(temperature=float("nan")),
    Sampling(top_p=1.5), Sampling(top_p=-0.5), Sampling(top_k=-2), Sampling(max_tokens=-1),
    Sampling(max_tokens=256), Sampling(stop=["ok", ""]),
])
def test_bad_sampling_is_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        resolve_sampling(bad, **LIMITS)


def test_prompt_checks_name_the_prompt():
    assert check_prompt_ids(0, (1, 2, 3), 10, 256) == [1, 2, 3]
    for ids, word in (([], "empty"), ([1] * 256, "256 tokens"), ([1, 10], "vocabulary"), ([-1], "vocabulary")):
        with pytest.raises(InvalidArgument, match=rf"prompts\[3\].*{word}"):
            check_prompt_ids(3, ids, 10, 256)


def test_config_loading_and_errors(tmp_path, capsys):
    cfg = load(RolloutConfig, None, ["engine.model=/m", "limits.max_in_flight=8", "weights.staging=stream",
                                     "engine.chunked_prefill=false"])
    assert cfg.limits.max_in_flight == 8 and cfg.weights.staging == "stream" and cfg.replica_id
    assert cfg.engine.chunked_prefill is False and cfg.server.port == 50051
    with pytest.raises(ConfigError):
        load(RolloutConfig, None, ["engine.model=/m", "engine.modle=/x"])
    with pytest.raises(ValueError):
        load(RolloutConfig, None, ["engine.model=/m", "weights.staging=lazy"])
    with pytest.raises(SystemExit) as exit_:  # engine.model is required
        serve_main(["server.port=1"])
    assert exit_.value.code == 2
    assert "engine.model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--help-config"])
    assert exit_.value.code == 0 and "weights.staging" in capsys.readouterr().out
    w = load(WorkerConfig, None, ["rollout.address=h:1", "buffer.run_id=r1", "sampling.n=2"])
    assert w.rollout.address == "h:1" and w.buffer.run_id == "r1" and w.learner.address == ""
    with pytest.raises(ValueError):
        load(WorkerConfig, None, ["reward_input=json"])
    with pytest.raises(ConfigError, match=r"buffer\.max_policy_lag: .*use pacing\.max_policy_lag \(a learner"):
        load(WorkerConfig, None, ["buffer.max_policy_lag=2"])  # staleness is the learner's, not the worker's


def test_one_sampling_type_from_worker_config_to_the_engine():
    """The worker's `sampling.*` is the engine's `Sampling`; the proto is only its wire form."""
    w = load(WorkerConfig, None, ["sampling.temperature=0.7", "sampling.stop=[x]", "sampling.seed=5"])
    assert isinstance(w.sampling, Sampling) and w.sampling == Sampling(n=4, temperature=0.7, stop=["x"], seed=5)
    for s in (w.sampling, Sampling(), Sampling(n=2, top_p=0.5, top_k=3, max_tokens=9, skip_special_tokens=False)):
        assert _sampling(sampling_message(s)) == s
