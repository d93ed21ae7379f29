"""What the reward and reference services share: a scorer behind a `DynamicBatcher` and a
`GrpcServer`, started and stopped together, and their `instructrl serve <role>` entry point.

A scorer is transport-free and has two steps, so that concurrent requests share a forward
pass: `prepare(inputs)` validates one request (raising `InvalidArgument` that names the
item and field) and returns its prepared items with their token lengths; `forward(batch)`
runs prepared items of any number of requests in one pass. A servicer converts its proto
to the scorer's inputs, awaits `score`, and converts the results back: nothing else.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from instructrl.config import ConfigError, parse_cli
from instructrl.serving.batcher import BatchingConfig, DynamicBatcher, torch_threads
from instructrl.serving.server import GrpcServer, ServerConfig

C = TypeVar("C")


class Scorer(Protocol):
    name: str

    def prepare(self, inputs: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Validate one request; its prepared items and their token lengths (for batching)."""

    def forward(self, batch: list[Any]) -> Sequence[Any]:
        """One result per prepared item (possibly from several requests), in order."""


async def score(scorer: Scorer, batcher: DynamicBatcher, inputs: Sequence[Any], context) -> list:
    """Prepare one request and run it in the batcher within the RPC's deadline."""
    items, lengths = scorer.prepare(inputs)
    return await batcher.submit(items, lengths, timeout=context.time_remaining())


class ScoringServer:
    """Scorer + batcher + gRPC server, started and stopped together (tests start it in-process).

    `servicer(batcher)` builds the service's servicer once the batcher runs; `add_servicer`
    and `service_name` register it, as `GrpcServer` takes them."""

    def __init__(self, name: str, scorer: Scorer, server: ServerConfig, batching: BatchingConfig,
                 threads: int, servicer: Callable[[DynamicBatcher], object], add_servicer: Callable,
                 service_name: str):
        self.name, self.scorer, self.server_cfg, self.batching, self.threads = name, scorer, server, batching, threads
        self._servicer, self._add, self.service_name = servicer, add_servicer, service_name
        self.batcher: DynamicBatcher | None = None
        self.grpc: GrpcServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else -1

    async def start(self) -> ScoringServer:
        self.batcher = await DynamicBatcher(self.scorer.forward, self.batching, self.name,
                                            torch_threads(self.threads)).start()
        self.grpc = await GrpcServer(self.name, self.server_cfg, [
            (self._add, self._servicer(self.batcher), self.service_name)]).start()
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


def main(prog: str, cfg_cls: type[C], argv: list[str], description: str, example: str,
         build: Callable[[C], ScoringServer]) -> int:
    """`instructrl serve reward|reference`: load the config, load the model, then open the port
    (so SERVING means ready); a config or model error exits 2 with one line naming the field."""
    cfg = parse_cli(prog, cfg_cls, argv, description, example)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        torch_threads(cfg.torch_threads)()  # type: ignore[attr-defined]
        server = build(cfg)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.serve_forever())
    return 0
