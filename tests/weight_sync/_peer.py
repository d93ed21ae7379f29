"""A receiving rank in its own process for the transport tests (prints one JSON line per event).

usage: python _peer.py PORT MODE   (MODE: once | stall-then-rejoin)
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

from instructrl.weight_sync import WeightReceiver, plan_buckets

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _tensors import BUCKET_BYTES, named_tensors  # noqa: E402


def digest(named) -> dict:
    return {n: hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
            for n, t in named}


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main(port: int, mode: str) -> None:
    manifest = plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in named_tensors()], BUCKET_BYTES)
    r = WeightReceiver(f"tcp://127.0.0.1:{port}", 1, 2, "gloo", 20.0, group_id="g1")
    say(event="received", digest=digest(r.receive(manifest)), bytes=r.bytes_received)
    if mode == "stall-then-rejoin":
        t0 = time.monotonic()
        try:
            for _ in r.receive(manifest, timeout_s=2.0):
                pass
            say(event="no-timeout")
        except TimeoutError as e:
            say(event="timeout", seconds=time.monotonic() - t0, error=str(e), broken=r.broken)
        r.close()
        r = WeightReceiver(f"tcp://127.0.0.1:{port}", 1, 2, "gloo", 20.0, group_id="g2")
        say(event="received", digest=digest(r.receive(manifest)), bytes=r.bytes_received)
    r.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
