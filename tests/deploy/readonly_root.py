"""Run a command as a pod with `readOnlyRootFilesystem: true` would: in a private mount
namespace (`unshare --mount`, root only) where every filesystem is read-only except
/proc, /sys, /dev (with /dev/shm, the pod's memory emptyDir) and the writable directories
bound in (`SRC:DST`: a private directory shown at DST, as the chart's emptyDirs and PVCs are
mounted into the pod, e.g. SRC:/tmp). Nothing outside the namespace changes.

    python tests/deploy/readonly_root.py --bind SRC:DST ... -- COMMAND ...
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

PRELUDE = r"""
set -e
mount --make-rprivate /
{binds}
# every other mount that is writable now becomes read-only (kernel filesystems excepted)
awk '{{print $5, $6}}' /proc/self/mountinfo | while read -r mp opts; do
  case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  for d in {targets}; do [ "$mp" = "$d" ] && continue 2; done
  case ",$opts," in *,ro,*) continue ;; esac
  mount -o remount,bind,ro "$mp"
done
# the root filesystem really is read-only here
if touch /.instructrl-rofs-probe 2>/dev/null; then
  rm -f /.instructrl-rofs-probe; echo "root is writable" >&2; exit 97
fi
exec "$@"
"""


def available() -> str | None:
    """None when this machine can run it, else why not (one line)."""
    if os.geteuid() != 0:
        return "read-only-root tests need root (a private mount namespace); CI runs as root"
    if shutil.which("unshare") is None:
        return "read-only-root tests need util-linux's unshare"
    return None


def command(argv: list[str], binds: dict[str, str]) -> list[str]:
    """`argv` wrapped to run under a read-only root with each `binds` source directory writable
    at its destination (both must exist)."""
    lines = [f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}" for src, dst in binds.items()]
    script = PRELUDE.format(binds="\n".join(lines), targets=" ".join(shlex.quote(d) for d in binds.values()))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "readonly-root", *argv]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", action="append", default=[], help="SRC:DST")
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    os.execvp("unshare", command(argv, dict(b.split(":", 1) for b in a.bind)))
    return 127


if __name__ == "__main__":
    sys.exit(main())
