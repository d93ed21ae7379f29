"""WeightSender / WeightReceiver between two real processes over gloo on loopback."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import torch

from instructrl.v1 import rollout_pb2
from instructrl.weight_sync import WeightReceiver, WeightSender, plan_buckets
from instructrl.weight_sync import group as wg

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _peer import digest  # noqa: E402
from _tensors import BUCKET_BYTES, named_tensors  # noqa: E402

PEER = pathlib.Path(__file__).parent / "_peer.py"


class Peer:
    def __init__(self, port: int, mode: str):
        self.proc = subprocess.Popen([sys.executable, str(PEER), str(port), mode], stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def event(self, timeout: float = 60) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"peer exited with {self.proc.wait(timeout)}"
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _manifest():
    return plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in named_tensors()], BUCKET_BYTES)


def test_bucketed_broadcast_round_trip():
    store = wg.host_store("127.0.0.1", 0, 30)
    peer = Peer(store.port, "once")
    try:
        sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 2, "gloo", 30, group_id="g1", store=store)
        manifest = _manifest()
        assert len(manifest.buckets) > 3
        sent = sender.broadcast(named_tensors(), manifest)
        ev = peer.event()
        assert ev["event"] == "received" and ev["bytes"] == sent
        assert ev["digest"] == digest(named_tensors())
        sender.close()
    finally:
        peer.close()


def test_stall_times_out_and_a_new_group_works():
    store = wg.host_store("127.0.0.1", 0, 30)
    peer = Peer(store.port, "stall-then-rejoin")
    try:
        init = f"tcp://127.0.0.1:{store.port}"
        sender = WeightSender(init, 2, "gloo", 30, group_id="g1", store=store)
        manifest = _manifest()
        sender.broadcast(named_tensors(), manifest)
        assert peer.event()["event"] == "received"
        # Stall: the first bucket goes out, then the sender stops.
        wg.broadcast(sender.pg, torch.zeros(manifest.buckets[0].nbytes, dtype=torch.uint8), 10).wait()
        ev = peer.event()
        assert ev["event"] == "timeout" and 1.5 < ev["seconds"] < 8 and ev["broken"], ev
        sender.close()
        sender = WeightSender(init, 2, "gloo", 30, group_id="g2", store=store)
        sent = sender.broadcast(named_tensors(), manifest)
        ev = peer.event()
        assert ev["event"] == "received" and ev["bytes"] == sent and ev["digest"] == digest(named_tensors())
        sender.close()
    finally:
        peer.close()


def _pair_that_never_reads(store, group_id: str) -> tuple[WeightSender, WeightReceiver]:
    """A sender and a receiver (rank 1) that joined `group_id` but never posts a receive."""
    box: dict[str, WeightReceiver] = {}
    t = threading.Thread(target=lambda: box.update(
        r=WeightReceiver(f"tcp://127.0.0.1:{store.port}", 1, 2, "gloo", 30, group_id=group_id)))
    t.start()
    sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 2, "gloo", 30, group_id=group_id, store=store)
    t.join()
    return sender, box["r"]


def _big() -> tuple[list, rollout_pb2.WeightManifest]:
    """One tensor, more than socket buffers can absorb, and its manifest (1 MB buckets)."""
    big = [("x", torch.zeros(16 * 1024 * 1024 // 4))]
    return big, plan_buckets([("x", torch.float32, tuple(big[0][1].shape))], 1 << 20)


def test_sender_times_out_when_no_receiver_reads():
    store = wg.host_store("127.0.0.1", 0, 30)
    sender, receiver = _pair_that_never_reads(store, "g")
    big, m = _big()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        sender.broadcast(big, m, timeout_s=1.5)
    assert time.monotonic() - t0 < 6
    assert sender.broken
    with pytest.raises(RuntimeError):
        sender.broadcast(big, m)
    sender.close()
    receiver.close()


def test_sender_rejects_tensors_that_do_not_match_the_manifest():
    store = wg.host_store("127.0.0.1", 0, 30)
    sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 1, "gloo", 10, group_id="solo", store=store)
    m = plan_buckets([("a", torch.float32, (4,)), ("b", torch.float32, (4,))], 1024)
    with pytest.raises(ValueError, match="manifest order"):
        sender.broadcast([("b", torch.zeros(4)), ("a", torch.zeros(4))], m)
    sender.close()
    sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 1, "gloo", 10, group_id="solo2", store=store)
    with pytest.raises(ValueError):
        sender.broadcast([("a", torch.zeros(5)), ("b", torch.zeros(4))], m)
    sender.close()
    sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 1, "gloo", 10, group_id="solo3", store=store)
    with pytest.raises(ValueError):
        sender.broadcast([("a", torch.zeros(4))], m)  # runs out
    sender.close()


def test_an_abandoned_update_releases_its_receivers_at_once_and_an_interrupted_sender_stops():
    """Issue 13 scenario 3: when the learner gives an update up (a member is gone), the other
    receivers must stop waiting now, not at their deadline, so they can join the resend."""
    store = wg.host_store("127.0.0.1", 0, 30)
    box: dict = {}

    def receive() -> None:
        r = box["r"] = WeightReceiver(f"tcp://127.0.0.1:{store.port}", 1, 2, "gloo", 30, group_id="g")
        t0 = time.monotonic()
        try:
            for _ in r.receive(_manifest(), timeout_s=20):
                pass
        except Exception as e:  # noqa: BLE001 - the test checks which
            box["error"], box["seconds"] = e, time.monotonic() - t0

    t = threading.Thread(target=receive)
    t.start()
    sender = WeightSender(f"tcp://127.0.0.1:{store.port}", 2, "gloo", 30, group_id="g", store=store)
    time.sleep(1.0)  # the receiver is waiting for the first bucket, which never comes
    wg.abandon(store, "g")
    t.join(10)
    assert isinstance(box.get("error"), wg.Interrupted) and box["seconds"] < 1.0 + 3 * wg.SLICE_S + 1, box
    assert box["r"].broken
    box["r"].close()
    sender.close()
    # the sender side: a broadcast nobody reads stops as soon as `interrupted` gives a reason
    sender, receiver = _pair_that_never_reads(store, "g2")
    big, m = _big()
    t0 = time.monotonic()
    with pytest.raises(wg.Interrupted, match="member gone"):
        sender.broadcast(big, m, timeout_s=20, interrupted=lambda: "member gone" if time.monotonic() - t0 > 1 else None)
    assert time.monotonic() - t0 < 1 + 3 * wg.SLICE_S + 1 and sender.broken
    sender.close()
    receiver.close()
