"""`instructrl status ADDRESS`: a running learner's status (its `GetStatus`), as text or JSON.

    instructrl status 127.0.0.1:50054
    instructrl status instructrl-learner:50051 --ca-file ca.crt --server-name instructrl.example \\
        --token-file token --json

TLS and token as every client takes them (`instructrl.serving.client`): `--ca-file` turns TLS on
(or $INSTRUCTRL_TLS_DIR/ca.crt in a pod of the chart), `--cert-file`/`--key-file` present a client
certificate (the chart's `tls.mtls`), `--server-name` is the chart's `tls.serverName`, and the
token is `--token`, `--token-file` or $INSTRUCTRL_TOKEN (the chart's `auth.token`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import grpc

from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import learner_pb2, learner_pb2_grpc

SCALARS = ("policy_version", "optimizer_step", "max_iterations", "finished", "samples_trained", "kl_coef",
           "max_policy_lag", "policy_lag_mean", "buffer_depth", "outstanding", "stale_dropped", "last_checkpoint")


def as_dict(status: learner_pb2.LearnerStatus) -> dict[str, Any]:
    """The status as plain JSON types (every field, defaults included)."""
    out: dict[str, Any] = {k: getattr(status, k) for k in SCALARS}
    out["replicas"] = [{"replica_id": r.replica_id, "address": r.address, "policy_version": r.policy_version,
                        "failed_syncs": r.failed_syncs} for r in status.replicas]
    return out


def fetch(cfg: ClientConfig) -> dict[str, Any]:
    """Call the learner's `GetStatus` (raises `grpc.RpcError`)."""
    with sync_channel(cfg) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        return as_dict(stub.GetStatus(learner_pb2.GetLearnerStatusRequest(), timeout=cfg.timeout_s))


def render(s: dict[str, Any]) -> str:
    """The status as text, one fact a line."""
    limit = f" of {s['max_iterations']}" if s["max_iterations"] > 0 else ""
    lag = "off" if s["max_policy_lag"] < 0 else str(s["max_policy_lag"])
    lines = [
        f"policy_version   {s['policy_version']}{limit}{' (finished)' if s['finished'] else ''}",
        f"optimizer_step   {s['optimizer_step']}",
        f"samples_trained  {s['samples_trained']}",
        f"kl_coef          {s['kl_coef']:.4f}",
        f"buffer           depth {s['buffer_depth']}, outstanding {s['outstanding']}, "
        f"stale dropped {s['stale_dropped']}",
        f"policy lag       {s['policy_lag_mean']:.2f} (mean of the last batch; max_policy_lag {lag})",
        f"last checkpoint  {s['last_checkpoint'] or '(none yet)'}",
        f"replicas         {len(s['replicas'])}",
    ]
    for r in s["replicas"]:
        behind = s["policy_version"] - r["policy_version"]
        note = f", {r['failed_syncs']} failed syncs" if r["failed_syncs"] else ""
        lines.append(f"  {r['replica_id']:<20} {r['address']:<22} v{r['policy_version']} "
                     f"({'current' if behind == 0 else f'{behind} behind'}{note})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="instructrl status", description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("address", help="host:port of the learner's LearnerService")
    ap.add_argument("--json", action="store_true", help="print the status as one JSON object")
    ap.add_argument("--ca-file", default="", help="PEM CA to verify the learner (TLS on)")
    ap.add_argument("--cert-file", default="", help="client certificate (mTLS)")
    ap.add_argument("--key-file", default="", help="client key (mTLS)")
    ap.add_argument("--server-name", default="", help="name to expect in the learner's certificate (tls.serverName)")
    ap.add_argument("--token", default="", help="bearer token (default: $INSTRUCTRL_TOKEN)")
    ap.add_argument("--token-file", default="", help="file holding the bearer token (a mounted Secret)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    return ap


def main(argv: list[str]) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    token = args.token
    if args.token_file:
        try:
            token = pathlib.Path(args.token_file).read_text().strip()
        except OSError as e:
            ap.error(f"--token-file: {e.strerror}: {args.token_file}")
    for flag in ("ca_file", "cert_file", "key_file"):
        if getattr(args, flag) and not pathlib.Path(getattr(args, flag)).is_file():
            ap.error(f"--{flag.replace('_', '-')}: no such file: {getattr(args, flag)}")
    if bool(args.cert_file) != bool(args.key_file):
        ap.error("--cert-file and --key-file go together")
    cfg = ClientConfig(address=args.address, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                       token=token, timeout_s=args.timeout, server_name_override=args.server_name)
    try:
        status = fetch(cfg)
    except grpc.RpcError as e:
        print(f"instructrl status: {args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(json.dumps(status) if args.json else render(status))
    return 0
