"""The reference service: `ReferenceService.LogProbs` over `scorer.py`, batched across requests.

`instructrl serve reference --config reference.yaml server.port=50053` runs it (see docs/services.md).
"""
from __future__ import annotations

import asyncio
import logging
import sys

from instructrl.config import ConfigError, parse_cli
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.scorer import LogProbsInput, ReferenceScorer
from instructrl.serving.batcher import DynamicBatcher, torch_threads
from instructrl.serving.server import GrpcServer
from instructrl.v1 import reference_pb2, reference_pb2_grpc

SERVICE_NAME = "instructrl.v1.ReferenceService"
log = logging.getLogger(__name__)


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, scorer: ReferenceScorer, batcher: DynamicBatcher):
        self.scorer = scorer
        self.batcher = batcher

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context) -> reference_pb2.LogProbsResponse:
        items, lengths = self.scorer.prepare(
            [LogProbsInput(list(it.token_ids), it.response_start) for it in request.items])
        results = await self.batcher.submit(items, lengths, timeout=context.time_remaining())
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.LogProbsResult(logprobs=lp) for lp in results], model=self.scorer.name)


class ReferenceServer:
    """Scorer + batcher + gRPC server, started and stopped together (tests start it in-process)."""

    def __init__(self, cfg: ReferenceConfig, scorer: ReferenceScorer | None = None):
        self.cfg = cfg
        self.scorer = scorer if scorer is not None else ReferenceScorer(cfg)
        self.batcher: DynamicBatcher | None = None
        self.grpc: GrpcServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else -1

    async def start(self) -> "ReferenceServer":
        self.batcher = await DynamicBatcher(self.scorer.forward, self.cfg.batching, "reference",
                                            torch_threads(self.cfg.torch_threads)).start()
        servicer = ReferenceServicer(self.scorer, self.batcher)
        self.grpc = await GrpcServer("reference", self.cfg.server, [
            (reference_pb2_grpc.add_ReferenceServiceServicer_to_server, servicer, SERVICE_NAME)]).start()
        return self

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight RPCs (their batches still run), then stop the batcher."""
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.batcher is not None:
            await self.batcher.close()

    async def serve_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully."""
        await self.start()
        assert self.grpc is not None
        try:
            await self.grpc.wait()
        finally:
            await self.stop()



def main(argv: list[str]) -> int:
    cfg = parse_cli("instructrl serve reference", ReferenceConfig, argv, __doc__.splitlines()[0],
                    "server.port=50053")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        torch_threads(cfg.torch_threads)()
        server = ReferenceServer(cfg)  # loads the model before the port opens: SERVING means ready
    except ConfigError as e:
        print(f"instructrl serve reference: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.serve_forever())
    return 0
