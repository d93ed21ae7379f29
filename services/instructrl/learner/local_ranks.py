"""Several learner ranks in one pod: torchrun-style local ranks, one GPU each.

A learner pod with k GPUs runs k ranks. The chart gives every pod the same environment plus
its ordinal:

    NODE_RANK         the pod's ordinal (StatefulSet pod-index)
    LOCAL_WORLD_SIZE  ranks per pod (k)
    WORLD_SIZE        ranks in all (pods x k)
    MASTER_ADDR/PORT  rank 0's rendezvous (pod 0), as with one rank per pod

`instructrl serve learner` started that way (no `RANK` yet) becomes the pod's launcher: with
k = 1 it sets `RANK = NODE_RANK`, `LOCAL_RANK = 0` and runs the learner itself; with k > 1 it
starts k learner processes with `LOCAL_RANK = i` and `RANK = NODE_RANK * k + i` (torchrun's
numbering, so rank r runs on GPU r mod k of pod r // k) and supervises them: SIGTERM/SIGINT are
passed on (each rank finishes its iteration and checkpoints, as a single rank does), and when
one rank fails the others are stopped, since a collective cannot finish without it. The
rendezvous itself is unchanged: every rank meets at MASTER_ADDR:MASTER_PORT through
torch.distributed's env:// (`instructrl.deepspeed_setup.init_distributed`).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

KILL_AFTER_S = 30.0  # after one rank failed: how long the others get to stop before SIGKILL


def wanted(environ: Mapping[str, str]) -> bool:
    """True when this process is a pod's launcher (NODE_RANK given, RANK not yet)."""
    return "NODE_RANK" in environ and "RANK" not in environ


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: an integer is required") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: must be >= {minimum}")
    return value


def rank_envs(environ: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank of this pod (`environ` plus RANK, LOCAL_RANK, ...).

    Raises `ValueError` naming the variable when the pod's variables do not fit together.
    """
    node = _int(environ, "NODE_RANK", 0)
    local = _int(environ, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in environ else 1
    world = _int(environ, "WORLD_SIZE", 1) if "WORLD_SIZE" in environ else local
    if world % local:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local} (ranks per pod)")
    if (node + 1) * local > world:
        raise ValueError(f"NODE_RANK={node}: {world // local} pod(s) of {local} rank(s) make WORLD_SIZE={world}; "
                         f"the ordinals are 0..{world // local - 1}")
    return [{**environ, "RANK": str(node * local + i), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(local),
             "WORLD_SIZE": str(world), "GROUP_RANK": str(node)} for i in range(local)]


def launch(argv: Sequence[str]) -> int | None:
    """Become this pod's launcher. Returns None when this process is the only rank (its
    environment now holds RANK/LOCAL_RANK: go on and train); otherwise runs the local
    ranks to the end and returns the pod's exit code."""
    envs = rank_envs(os.environ)
    if len(envs) == 1:
        os.environ.update(envs[0])
        return None
    cmd = [sys.executable, "-m", "instructrl.learner.server", *argv]
    return supervise(cmd, envs)


def supervise(cmd: Sequence[str], envs: Sequence[Mapping[str, str]], kill_after_s: float = KILL_AFTER_S) -> int:
    """Run `cmd` once per environment in `envs` until all exit; returns 0 or the first failure's code.

    SIGTERM/SIGINT are forwarded to every child. When a child exits non-zero the others get
    SIGTERM, and SIGKILL after `kill_after_s` (they may hang in a collective with the dead rank).
    """
    procs = [subprocess.Popen(list(cmd), env=dict(e)) for e in envs]
    log.info("started %d local ranks: %s", len(procs), [e["RANK"] for e in envs])

    def forward(signum, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: int | None = None
    kill_at = None
    try:
        while [p.poll() for p in procs].count(None):  # poll every child (any() would stop at the first)
            if failed is None:
                bad = [(e["RANK"], p.returncode) for e, p in zip(envs, procs, strict=True)
                       if p.returncode not in (None, 0)]
                if bad:
                    rank, failed = bad[0]
                    log.error("rank %s exited with %s; stopping the pod's other ranks", rank, failed)
                    forward(signal.SIGTERM, None)
                    kill_at = time.monotonic() + kill_after_s
            if kill_at is not None and time.monotonic() > kill_at:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed is None:
        failed = next((p.returncode for p in procs if p.returncode), 0)
    return _exit_code(failed)


def _exit_code(returncode: int) -> int:
    """A child killed by signal N (returncode -N) makes the pod exit 128 + N, as a shell would."""
    return 128 - returncode if returncode < 0 else returncode
