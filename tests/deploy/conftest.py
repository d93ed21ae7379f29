"""Fixtures of the deployment tests: metrics processes and a real Prometheus scraping them.

`metrics_targets` is what Prometheus scrapes as the healthy deployment (namespace label
"healthy"): the real reward service (local_services.py, kept busy with Score calls) and a
metrics_exporter.py process playing a healthy run over the services' real metric
declarations for what does not run here yet (rollout, reference, learner, buffer). Add the
other services to it as they become cheap to start (e.g. `instructrl launch` with fixed
metrics ports) and drop the exporter. `failing_metrics_targets` (namespace "failing")
always plays a broken run, so that every alert has something to fire on.
`replicated_targets` (namespace "replicated") scrapes the healthy exporter three times under
three job names: a run in which three processes export the same run-wide gauges (the buffer
depth), as the rollout workers and the learner do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import deploy_support as ds
import pytest
import yaml
from local_services import RewardService
from prometheus_api import Prometheus

EXPORTER = ds.ROOT / "tests" / "deploy" / "metrics_exporter.py"


@pytest.fixture(scope="session")
def rendered() -> dict[str, ds.Rendered]:
    """The chart rendered for the defaults and every helm/instructrl/ci/*-values.yaml."""
    return {name: ds.render(values) for name, values in ds.ci_values().items()}


@dataclass
class ScrapeJob:
    name: str
    targets: list[str]
    namespace: str                      # the `namespace` label Prometheus attaches
    standin: bool = False               # played by metrics_exporter.py, not a real service
    steady: bool = True                 # past start-up: no alert may fire for it
    report: dict = field(default_factory=dict)


def _start_exporter(scenario: str) -> tuple[subprocess.Popen, int, dict]:
    port = ds.free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(EXPORTER), "--port", str(port), "--scenario", scenario],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    line = proc.stdout.readline()  # the report, printed once the port is open
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"metrics_exporter.py ({scenario}) died: {proc.stderr.read()[-3000:]}", pytrace=False)
    return proc, port, json.loads(line)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def metrics_targets(tmp_path_factory):
    reward = RewardService(tmp_path_factory.mktemp("services")).start()
    try:
        proc, port, report = _start_exporter("healthy")
        try:
            reward.wait_ready()
        except (RuntimeError, TimeoutError) as err:
            _stop(proc)
            pytest.fail(str(err), pytrace=False)
        yield [ScrapeJob("healthy", [f"127.0.0.1:{port}"], "healthy", standin=True, report=report),
               ScrapeJob("reward", [f"127.0.0.1:{reward.metrics_port}"], "healthy")]
        _stop(proc)
    finally:
        reward.stop()


@pytest.fixture(scope="session")
def replicated_targets(metrics_targets):
    exporter = next(j for j in metrics_targets if j.standin)
    return [ScrapeJob(f"replica-{x}", exporter.targets, "replicated", standin=True, report=exporter.report)
            for x in "abc"]


@pytest.fixture(scope="session")
def failing_metrics_targets():
    proc, port, report = _start_exporter("failing")
    yield [ScrapeJob("failing", [f"127.0.0.1:{port}"], "failing", standin=True, report=report)]
    _stop(proc)


def prometheus_config(jobs: list[ScrapeJob]) -> dict:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ds.ALERTS)],
        "scrape_configs": [
            {"job_name": j.name, "honor_labels": True,
             "static_configs": [{"targets": j.targets, "labels": {"namespace": j.namespace}}]}
            for j in jobs],
    }


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory, metrics_targets, failing_metrics_targets, replicated_targets):
    """A real Prometheus on a free loopback port, with the alert rules loaded, that has
    scraped every target at least 6 times."""
    binary = ds.require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    all_jobs = metrics_targets + failing_metrics_targets + replicated_targets
    config.write_text(yaml.safe_dump(prometheus_config(all_jobs)))
    check = subprocess.run([ds.require_binary("promtool"), "check", "config", str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = ds.free_port()
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-3000:]}", pytrace=False)
            if prom.ready():
                jobs = len(all_jobs)
                scraped = prom.query("count_over_time(up[1m]) >= 6")
                if len(scraped) >= jobs and prom.query("min(up) == 1"):
                    break
            time.sleep(0.5)
        else:
            pytest.fail("prometheus did not scrape every target 6 times in 60 s", pytrace=False)
        yield prom
    finally:
        _stop(proc)
        log.close()
