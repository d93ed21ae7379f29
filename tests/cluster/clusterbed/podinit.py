"""Start one container: run as `ip netns exec <pod ns> python podinit.py SPEC.json`.

Standard library only. Inside the pod's network namespace (and the private mount namespace
`ip netns exec` makes, with / a slave of the machine's), it builds what a container runtime
would, then execs the container's command:

1. a PID namespace: the command runs as PID 1 of its own namespace (as in a container, it gets
   SIGTERM only if it handles it, and every process it started dies with it); this process stays
   outside as its parent, forwards SIGTERM/SIGINT/SIGHUP to it and exits with its status;
2. the pod's hostname (a UTS namespace per container: the same name in every container);
3. a root filesystem: an overlay whose lower layer is this machine's / and whose upper layer is
   a tmpfs (the container's writable layer: nothing it writes outside its volumes reaches the
   machine, and a restart starts from a clean layer), with /proc of its PID namespace, /sys and
   /dev bound in;
4. /etc/hosts and /etc/resolv.conf of the pod (/etc/netns/<ns>/, rewritten by the bed in place
   as Services change), and the volumes at their mount paths;
5. chroot, working directory, environment, exec.

SPEC.json: {"hostname", "layer" (a directory for the writable layer), "pidfile", "netns_etc",
"mounts": [{"source", "target", "read_only", "tmpfs_size"}], "argv", "env", "workdir"}.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys

CLONE_NEWPID, CLONE_NEWUTS = 0x20000000, 0x04000000
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

libc = ctypes.CDLL(None, use_errno=True)


def fail(msg: str) -> None:
    print(f"podinit: {msg}", file=sys.stderr, flush=True)
    os._exit(127)


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"mount {' '.join(args)}: {r.stderr.strip()}")


def unshare(flags: int) -> None:
    if libc.unshare(flags) != 0:
        fail(f"unshare({flags:#x}): {os.strerror(ctypes.get_errno())}")


def make_target(root: str, target: str, is_file: bool) -> str:
    """The mount point inside the new root (created in the writable layer if missing)."""
    path = root + target
    os.makedirs(os.path.dirname(path) if is_file else path, exist_ok=True)
    if is_file and not os.path.exists(path):
        open(path, "a").close()
    return path


def build_root(spec: dict) -> str:
    layer = spec["layer"]
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", layer)
    upper, work, root = (os.path.join(layer, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d)
    mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", root)
    mount("-t", "proc", "proc", root + "/proc")
    mount("--rbind", "/sys", root + "/sys")
    mount("--rbind", "/dev", root + "/dev")
    for name in ("hosts", "resolv.conf"):
        src = os.path.join(spec["netns_etc"], name)
        if os.path.exists(src):
            mount("--bind", src, make_target(root, f"/etc/{name}", True))
    for m in spec["mounts"]:
        if m["tmpfs_size"]:
            mount("-t", "tmpfs", "-o", f"size={m['tmpfs_size']},mode=1777", "tmpfs",
                  make_target(root, m["target"], False))
            continue
        target = make_target(root, m["target"], os.path.isfile(m["source"]))
        mount("--bind", m["source"], target)
        if m["read_only"]:
            mount("-o", "remount,bind,ro", target)
    return root


def container(spec: dict) -> None:
    """PID 1 of the container's namespaces: build the root, then exec the command."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    mount("--make-rprivate", "/")
    socket.sethostname(spec["hostname"])
    root = build_root(spec)
    os.chroot(root)
    os.makedirs(spec["workdir"], exist_ok=True)
    os.chdir(spec["workdir"])
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        fail(f"exec {argv[0]}: {e}")


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    unshare(CLONE_NEWPID | CLONE_NEWUTS)
    child = os.fork()
    if child == 0:
        container(spec)
    with open(spec["pidfile"], "w") as f:
        f.write(str(child))

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass
    for sig in FORWARDED:
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
