"""A throwaway CA for `instructrl launch tls.enabled=true`: mTLS and a bearer token between the
local processes, so the secure path (the chart's) is the one local runs and their tests use.

Generated once per workdir with the `openssl` command into `<workdir>/tls/`: `ca.crt` (and its
key), one certificate `tls.crt`/`tls.key` for `localhost` and `127.0.0.1` with both the serverAuth
and clientAuth usages (every process is server and client, as in the chart), and `token`. Every
process gets them through the environment the chart's pods use (`INSTRUCTRL_TLS_DIR`,
`INSTRUCTRL_MTLS`, `INSTRUCTRL_TOKEN`; serving/client.py); servers get `server.tls.*` (launcher/run.py).
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import subprocess

from instructrl.config import ConfigError

DAYS = "30"


def _openssl(cwd: pathlib.Path, *args: str) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"tls.enabled: openssl {args[0]} failed: {e.stderr.strip()[:300]}") from None


def throwaway_tls(out: pathlib.Path) -> dict[str, str]:
    """Create (if missing) the CA, certificate and token in `out`; returns the environment that
    makes every instructrl process use them."""
    if shutil.which("openssl") is None:
        raise ConfigError("tls.enabled: generating the throwaway CA needs the `openssl` command")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    if not (out / "tls.crt").exists():
        _openssl(out, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", DAYS, "-subj", "/CN=instructrl-launch-ca")
        _openssl(out, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
                 "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                 "-addext", "extendedKeyUsage=serverAuth,clientAuth")
        _openssl(out, "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "tls.crt", "-days", DAYS, "-copy_extensions", "copy")
    token_file = out / "token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(24))
        os.chmod(token_file, 0o600)
    return {"INSTRUCTRL_TLS_DIR": str(out), "INSTRUCTRL_MTLS": "true",
            "INSTRUCTRL_TOKEN": token_file.read_text().strip()}


def server_tls(out: pathlib.Path) -> dict[str, object]:
    """The `server.tls` section of every server: mTLS with the throwaway certificate."""
    return {"cert_file": str(out / "tls.crt"), "key_file": str(out / "tls.key"), "ca_file": str(out / "ca.crt"),
            "require_client_auth": True}
