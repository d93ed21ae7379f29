"""Connecting by URL: ACL user + password, TLS with a client certificate, config checks."""
import shutil
import subprocess
import time

import pytest
import redis
from buffer_records import make_experience
from redis_server import RedisServer, free_port

from instructrl.buffer import BufferConfig, ExperienceBuffer, PacingConfig, RedisConfig, redis_from_url
from instructrl.config import ConfigError, from_dict

# the least privilege the buffer needs (docs/buffer.md): its own keys, no pub/sub
ACL = ["--user", "default", "off",
       "--user", "alice", "on", ">s3cret", "resetkeys", "~instructrl:*", "resetchannels", "-@all",
       "+@read", "+@write", "+@scripting", "+@transaction", "+@connection", "+time"]


def round_trip(cfg: BufferConfig) -> None:
    with ExperienceBuffer.open(cfg) as buf:
        buf.put([make_experience("a/e0/s0")])
        batch = buf.get(1, "c", block_ms=0)
        assert buf.ack(batch) == [True]


def test_acl_user_and_password_from_url_or_fields(tmp_path, monkeypatch):
    with RedisServer(tmp_path, args=ACL) as server:
        port = server.port
        round_trip(BufferConfig(redis=RedisConfig(url=f"redis://alice:s3cret@127.0.0.1:{port}/0"),
                                run_id="acl-url"))
        round_trip(BufferConfig(redis=RedisConfig(url=f"redis://127.0.0.1:{port}/0", username="alice",
                                                  password="s3cret"), run_id="acl-fields"))
        monkeypatch.setenv("INSTRUCTRL_REDIS_PASSWORD", "s3cret")
        round_trip(BufferConfig(redis=RedisConfig(url=f"redis://127.0.0.1:{port}/0", username="alice"),
                                run_id="acl-env"))
        other = redis_from_url(RedisConfig(url=f"redis://alice:s3cret@127.0.0.1:{port}/0"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.set("not-instructrl", 1)
        other.close()
        bad = redis_from_url(RedisConfig(url=f"redis://alice:wrong@127.0.0.1:{port}/0"))
        t0 = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        assert time.monotonic() - t0 < 1.0  # a wrong password fails at once, not after retries
        bad.close()


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=instructrl-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")
def test_rediss_with_ca_and_client_certificate(tmp_path):
    make_certs(tmp_path)
    port = free_port()
    tls = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "server.crt"),
           "--tls-key-file", str(tmp_path / "server.key"),
           "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "yes"]
    try:
        server = RedisServer(tmp_path / "redis", args=tls + ACL, port=port).start()
    except RuntimeError as err:
        if "tls" in str(err).lower():
            pytest.skip(f"redis-server built without TLS: {err}")
        raise
    with server:
        tls_cfg = dict(tls_ca_file=str(tmp_path / "ca.crt"),
                       tls_cert_file=str(tmp_path / "client.crt"),
                       tls_key_file=str(tmp_path / "client.key"))
        round_trip(BufferConfig(redis=RedisConfig(
            url=f"rediss://alice:s3cret@127.0.0.1:{port}/0", **tls_cfg), run_id="tls"))
        plain = redis_from_url(RedisConfig(url=f"rediss://alice:s3cret@127.0.0.1:{port}/0",
                                           retry_attempts=0))
        with pytest.raises(redis.ConnectionError):  # the server's CA is not trusted by default
            plain.ping()
        plain.close()


def test_config_is_checked():
    with pytest.raises(ValueError, match="run_id"):
        BufferConfig(run_id="a:b")
    for old in ("max_policy_lag", "stale_policy"):  # staleness moved to the learner's pacing.*
        with pytest.raises(ConfigError, match=rf"^{old}: this key was renamed; use pacing\.{old} \(a learner"):
            from_dict(BufferConfig, {old: 1})
    with pytest.raises(ValueError, match="pacing.stale_policy"):
        from_dict(PacingConfig, {"stale_policy": "fix"})
    with pytest.raises(ValueError, match="socket_timeout"):
        BufferConfig(block_ms=60_000)
    with pytest.raises(ValueError, match="rediss"):
        redis_from_url(RedisConfig(url="redis://127.0.0.1:1/0", tls_ca_file="ca.crt"))
