"""A real Prometheus scrapes a whole local run started by `instructrl launch` — Redis, reward,
reference, vLLM rollout, rollout worker, DeepSpeed learner, all real processes — and every
PromQL query of the Grafana dashboard returns a series, as does every metric selector of the
alert rules.
"""
from __future__ import annotations

import json
import subprocess
import time

import deploy_support as ds
import grpc
import pytest
import yaml
from prometheus_api import Prometheus

pytestmark = pytest.mark.slow


def _prompts(path, n=48):
    from instructrl.demo.task import answer, make_prompts
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": answer(p)}}) + "\n"
                            for i, p in enumerate(make_prompts(n, seed=0))))
    return path


def test_dashboard_and_alert_queries_on_a_real_local_run(tmp_path):
    from instructrl.config import from_dict
    from instructrl.demo.task import tokenizer_corpus
    from instructrl.launcher.config import LaunchConfig
    from instructrl.launcher.run import launch
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    model = tmp_path / "policy"
    build_tiny_llama(model, TinyModelConfig(hidden_size=64, num_heads=1, num_layers=1), tokenizer_corpus())
    cfg = from_dict(LaunchConfig, {
        "run_id": "prom-e2e", "workdir": str(tmp_path / "run"), "prompts": str(_prompts(tmp_path / "p.jsonl")),
        "epochs": 20,
        "reward": {"rule": "instructrl.reward.rules:exact_match", "tokenizer": str(model)},
        "reference": {"model": str(model)},
        "rollout": {"engine": {"model": str(model), "dtype": "float32", "max_model_len": 128,
                               "enforce_eager": True, "kv_cache_gb": 1}},
        "worker": {"sampling": {"n": 2, "max_tokens": 8}, "claim_batch": 8},
        "learner": {"model": {"actor_path": str(model)},
                    "ppo": {"batch_size": 16, "minibatch_size": 16, "micro_batch_size": 8, "epochs": 1,
                            "max_iterations": 200},
                    "buffer": {"capacity": 64}, "pacing": {"max_policy_lag": 1},
                    "checkpoint": {"every": 1000}},
    })
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    state: dict = {}

    def started(eps) -> None:
        targets = [f"127.0.0.1:{p}" for p in eps.metrics.values()]
        conf = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ds.ALERTS)],
                "scrape_configs": [{"job_name": "instructrl", "static_configs": [
                    {"targets": targets, "labels": {"namespace": "local"}}]}]}
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(conf))
        port = ds.free_port()
        state["proc"] = subprocess.Popen(
            [ds.require_binary("prometheus"), f"--config.file={prom_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        state["prom"] = Prometheus(f"http://127.0.0.1:{port}")
        state["targets"] = len(targets)
        state["t0"] = time.monotonic()
        # one malformed request, as clients make: the error counters and the error alert get a series
        from instructrl.v1 import reward_pb2, reward_pb2_grpc
        with grpc.insecure_channel(eps.reward) as ch:
            try:
                reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(), timeout=30)
            except grpc.RpcError as e:
                state["bad_request_code"] = e.code()

    def missing() -> list[str]:
        prom = state["prom"]
        empty = [f"{where}: {expr}" for where, expr in ds.dashboard_queries()
                 if not prom.query(ds.grafana_to_promql(expr, namespace="local"))]
        for rule in ds.alert_rules():
            empty += [f"alert {rule['alert']}: {sel}" for sel in sorted(ds.vector_selectors(rule["expr"]))
                      if not prom.query(sel)]
        return empty

    def done(rec: dict) -> bool:
        prom = state.get("prom")
        if prom is None or not prom.ready() or rec.get("policy_version", 0) < 3:
            return False
        up = prom.query("up == 1")
        if len(up) < state["targets"]:
            return False
        state["missing"] = missing()
        return not state["missing"] or time.monotonic() - state["t0"] > 120

    try:
        last = launch(cfg, stop_when=done, on_started=started)
    finally:
        if "proc" in state:
            state["proc"].terminate()
            state["proc"].wait(timeout=30)
    assert last.get("policy_version", 0) >= 3, last
    assert state.get("bad_request_code") == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing" in state, "prometheus never saw every target up"
    assert not state["missing"], f"{len(state['missing'])} queries returned nothing:\n" + "\n".join(state["missing"])
