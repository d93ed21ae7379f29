"""The learner: `LearnerService` over `Control` (gRPC thread, rank 0) + the training loop (main thread).

    instructrl serve learner --config learner.yaml ppo.max_iterations=100
    torchrun --nproc_per_node 2 -m instructrl.learner.server --config learner.yaml
    NODE_RANK=0 LOCAL_WORLD_SIZE=2 WORLD_SIZE=4 MASTER_ADDR=... MASTER_PORT=... instructrl serve learner ...
        (a pod of the chart: its local ranks, `instructrl.learner.local_ranks`)

Rank 0 serves the gRPC API in a background thread with its own asyncio loop; the PPO
loop (`loop.train`) runs in the main thread of every rank. SIGTERM/SIGINT ask the loop
to stop at the next iteration boundary; it writes a final checkpoint and exits.
See docs/learner.md.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import sys
import threading

from instructrl.config import parse_cli
from instructrl.learner import local_ranks
from instructrl.learner.config import LearnerConfig
from instructrl.learner.control import Control
from instructrl.serving.errors import DeadlineExceeded
from instructrl.serving.server import GrpcServer, ServerConfig
from instructrl.v1 import learner_pb2, learner_pb2_grpc

SERVICE_NAME = "instructrl.v1.LearnerService"
log = logging.getLogger(__name__)


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """Each RPC: proto -> `Control` call -> proto."""

    def __init__(self, control: Control):
        self.control = control

    async def GetStatus(self, request, context) -> learner_pb2.LearnerStatus:
        s = self.control.status()
        replicas = [learner_pb2.ReplicaStatus(replica_id=rid, address=r.address, policy_version=r.policy_version,
                                              failed_syncs=r.failed_syncs)
                    for rid, r in sorted(self.control.replica_states().items())]
        return learner_pb2.LearnerStatus(replicas=replicas, **dataclasses.asdict(s))

    async def RegisterRollout(self, request, context) -> learner_pb2.RegisterRolloutResponse:
        reported = request.policy_version if request.HasField("policy_version") else -1
        version = self.control.register(request.replica_id, request.address, reported, peer=context.peer())
        log.debug("rollout replica %s at %s registered at v%d", request.replica_id, request.address, reported)
        return learner_pb2.RegisterRolloutResponse(policy_version=version, accepted=True)

    async def UnregisterRollout(self, request, context) -> learner_pb2.UnregisterRolloutResponse:
        self.control.unregister(request.replica_id)
        return learner_pb2.UnregisterRolloutResponse()

    async def SaveCheckpoint(self, request, context) -> learner_pb2.SaveCheckpointResponse:
        fut = self.control.request_save(request.path)
        try:
            path, optimizer_step = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=context.time_remaining())
        except TimeoutError:
            raise DeadlineExceeded("the checkpoint did not finish before the deadline; "
                                   "it is still written at the next iteration boundary") from None
        return learner_pb2.SaveCheckpointResponse(path=path, optimizer_step=optimizer_step)


class ServerThread:
    """A `GrpcServer` running in a daemon thread with its own event loop."""

    def __init__(self, cfg: ServerConfig, control: Control):
        self.cfg, self.control = cfg, control
        self.loop = asyncio.new_event_loop()
        self.grpc: GrpcServer | None = None
        self._watch: asyncio.Future | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="learner-grpc", daemon=True)

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else -1

    def start(self) -> ServerThread:
        self._thread.start()
        self.grpc = GrpcServer("learner", self.cfg, [
            (learner_pb2_grpc.add_LearnerServiceServicer_to_server, LearnerServicer(self.control), SERVICE_NAME)])
        asyncio.run_coroutine_threadsafe(self.grpc.start(), self.loop).result(timeout=30)
        asyncio.run_coroutine_threadsafe(self._serving_when_ready(), self.loop).result(timeout=30)
        return self

    async def _serving_when_ready(self) -> None:
        """Health says NOT_SERVING until the loop has loaded (and resumed) its models."""
        server = self.grpc
        assert server is not None  # start() created it
        await server.set_serving(False)

        async def watch() -> None:
            while not self.control.ready.is_set():
                await asyncio.sleep(0.1)
            await server.set_serving(True)
        self._watch = asyncio.ensure_future(watch())

    def stop(self, grace: float | None = None) -> None:
        if self._watch is not None:
            self.loop.call_soon_threadsafe(self._watch.cancel)
        if self.grpc is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.grpc.stop(grace), self.loop).result(timeout=30)
            except concurrent.futures.TimeoutError:
                log.warning("learner gRPC server did not stop in 30s")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def main(argv: list[str]) -> int:
    cfg = parse_cli("instructrl serve learner", LearnerConfig, argv, __doc__.splitlines()[0], "ppo.kl_coef=0.05")
    if local_ranks.wanted(os.environ):  # a pod of the chart: NODE_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE
        try:
            code = local_ranks.launch(argv)
        except ValueError as e:
            print(f"instructrl serve learner: {e}", file=sys.stderr)
            return 2
        if code is not None:
            return code
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=getattr(logging, cfg.logging.level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    control = Control(cfg.checkpoint.dir, cfg.register_allow)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: control.stop.set())  # rank 0 tells the others via the batch header
    server = ServerThread(cfg.server, control).start() if rank == 0 and cfg.server.port >= 0 else None
    if server is not None:
        log.info("LearnerService on %s:%d", cfg.server.host, server.port)
    from instructrl.learner.loop import train  # heavy imports (DeepSpeed) after the port is open
    try:
        status = train(cfg, control=control)
        if status.finished and cfg.on_finish == "idle" and not control.stop.is_set():
            log.info("finished at policy_version %d; idle until stopped (on_finish=idle)", status.policy_version)
            while not control.stop.wait(1.0):
                pass
    finally:
        if server is not None:
            server.stop()
    log.info("learner stopped at policy_version %d", status.policy_version)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
