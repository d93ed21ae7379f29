"""What a LearnerService caller may ask for: checkpoint names and replica addresses (transport-free).

- `SaveCheckpoint` writes under `checkpoint.dir` only: the request names a directory there (one
  path component, no `..`, not absolute, not an `iteration-*` name that resume would take for
  a regular checkpoint).
- `RegisterRollout` makes the learner push the full policy weights to the address given, so
  the address must be `host:port` and, when `register_allow` is set, match one of its entries:
  `peer` (the host is the caller's own IP address: a replica registers itself, as the chart's
  rollout pods do with their pod IP), a CIDR (`10.0.0.0/8`), or a host name pattern
  (`*.my-namespace.svc.cluster.local`, `fnmatch` rules, case-insensitive).

Who may call at all is the token's and mTLS's business (serving/interceptors.py); see the trust
model in docs/operations.md.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import os
import re

from instructrl.serving.errors import InvalidArgument, PermissionDenied

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
PEER = "peer"


def checkpoint_path(checkpoint_dir: str, name: str) -> str:
    """`checkpoint_dir/name` for a SaveCheckpoint request ("" = the regular checkpoint: "")."""
    if not name:
        return ""
    if not _NAME.match(name) or name.startswith("iteration-"):
        raise InvalidArgument(f"path: {name[:200]!r} must be a directory name under checkpoint.dir (letters, digits, "
                              "'.', '_', '-'; no '/', no '..', not 'iteration-*')")
    return os.path.join(checkpoint_dir, name)


def parse_address(address: str) -> tuple[str, int]:
    """`(host, port)` of `host:port` (IPv6 as `[addr]:port`); InvalidArgument otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ok_host = _is_ip(host) and ":" in host
    else:
        ok_host = bool(_HOST.match(host)) or _is_ip(host)
    if not sep or not ok_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address: {address[:200]!r} is not host:port (a host name or IP address, "
                              "a port in 1..65535)")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def peer_ip(peer: str) -> str:
    """The IP address in a gRPC peer string (`ipv4:10.0.0.5:4321`, `ipv6:[::1]:4321`), or ""."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def check_allowed(host: str, peer: str, allow: list[str]) -> None:
    """PermissionDenied unless `host` matches an entry of `allow` (empty: any host)."""
    if not allow:
        return
    ip = ipaddress.ip_address(host) if _is_ip(host) else None
    for entry in allow:
        if entry == PEER:
            if ip is not None and peer_ip(peer) and ip == ipaddress.ip_address(peer_ip(peer)):
                return
        elif "/" in entry:
            if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                return
        elif ip is None and fnmatch.fnmatch(host.lower().rstrip("."), entry.lower()):
            return
    raise PermissionDenied(f"address: host {host!r} is not allowed by register_allow {allow} "
                           f"(caller {peer or 'unknown'})")


def validate_allow(allow: list[str]) -> None:
    """ValueError naming the first entry of `register_allow` that is not peer, a CIDR or a pattern."""
    for entry in allow:
        if entry == PEER:
            continue
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as e:
                raise ValueError(f"register_allow: {entry!r} is not a CIDR ({e})") from None
        elif not entry or any(c.isspace() for c in entry):
            raise ValueError(f"register_allow: {entry!r} is not a host name pattern")
