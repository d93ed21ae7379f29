"""`instructrl status ADDRESS` against a real LearnerService: text, --json, and the chart's TLS + token."""
from __future__ import annotations

import json
import subprocess

import pytest

from instructrl.learner import status as S
from instructrl.learner.control import Control
from instructrl.learner.server import ServerThread
from instructrl.serving.server import ServerConfig, TLSConfig


def _certs(d, san: str) -> None:
    """A CA and a server certificate for `san` (as the chart's one certificate for every role)."""
    def run(*a: str) -> None:
        subprocess.run(a, check=True, capture_output=True, cwd=d)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
        "-subj", "/CN=learner", "-addext", f"subjectAltName={san}")
    run("openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "2", "-copy_extensions", "copy")


def _control() -> Control:
    c = Control()
    c.publish(policy_version=7, optimizer_step=56, kl_coef=0.05, samples_trained=448, max_iterations=20,
              max_policy_lag=1, policy_lag_mean=0.5, stale_dropped=3, buffer_depth=12, outstanding=40,
              last_checkpoint="/ckpt/iteration-00000005")
    c.register("rollout-0", "10.0.0.5:50051", 7)
    c.register("rollout-1", "10.0.0.6:50051", 6)
    return c


@pytest.fixture
def plain_learner():
    server = ServerThread(ServerConfig(port=0, metrics_port=-1), _control()).start()
    yield f"127.0.0.1:{server.port}"
    server.stop(0)


def test_text_and_json(plain_learner, capsys):
    assert S.main([plain_learner]) == 0
    text = capsys.readouterr().out
    assert "policy_version   7 of 20" in text and "optimizer_step   56" in text
    assert "depth 12, outstanding 40, stale dropped 3" in text and "max_policy_lag 1" in text
    assert "last checkpoint  /ckpt/iteration-00000005" in text
    assert "rollout-0" in text and "v7 (current)" in text and "v6 (1 behind)" in text
    assert S.main([plain_learner, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["policy_version"] == 7 and got["buffer_depth"] == 12 and got["finished"] is False
    assert [(r["replica_id"], r["policy_version"]) for r in got["replicas"]] == [("rollout-0", 7), ("rollout-1", 6)]


def test_tls_server_name_and_token_as_the_chart_sets_them(tmp_path, capsys):
    """The chart: one certificate naming `tls.serverName` (not the address dialled), `auth.token`."""
    _certs(tmp_path, "DNS:instructrl.internal")
    tls = TLSConfig(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    server = ServerThread(ServerConfig(port=0, metrics_port=-1, tls=tls, token="s3cret"), _control()).start()
    addr = f"127.0.0.1:{server.port}"
    (tmp_path / "token").write_text("s3cret\n")
    ca = ["--ca-file", str(tmp_path / "ca.crt")]
    try:
        assert S.main([addr, *ca, "--server-name", "instructrl.internal", "--token-file", str(tmp_path / "token"),
                       "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["optimizer_step"] == 56
        assert S.main([addr, *ca, "--server-name", "instructrl.internal", "--token", "wrong"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert S.main([addr, "--token", "s3cret", "--timeout", "3"]) == 1  # plaintext to a TLS server
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.stop(0)


def test_bad_options_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["127.0.0.1:1", "--ca-file", str(tmp_path / "missing.crt")])
    assert e.value.code == 2 and "--ca-file: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        S.main(["127.0.0.1:1", "--token-file", str(tmp_path / "nope")])
    assert "--token-file" in capsys.readouterr().err
    assert S.main(["127.0.0.1:1", "--timeout", "1"]) == 1  # nothing there
    assert "127.0.0.1:1: " in capsys.readouterr().err


def test_the_launcher_asks_a_learner_under_its_throwaway_mtls(tmp_path):
    """`instructrl launch tls.enabled=true`: the launcher's progress lines ask the learner's status
    with the certificate and token it gave its processes (its own environment has neither)."""
    from instructrl.launcher.run import poll_status
    from instructrl.launcher.tls import server_tls, throwaway_tls

    env = throwaway_tls(tmp_path / "tls")
    tls = TLSConfig(**server_tls(tmp_path / "tls"))
    server = ServerThread(ServerConfig(port=0, metrics_port=-1, tls=tls, token=env["INSTRUCTRL_TOKEN"]),
                          _control()).start()
    addr = f"127.0.0.1:{server.port}"
    try:
        got = poll_status(addr, env)
        assert got is not None and got["optimizer_step"] == 56
        assert poll_status(addr, timeout_s=3) is None  # without them: refused, reported as no answer
    finally:
        server.stop(0)
