"""The reward service: `RewardService.Score` over `scorer.py`, batched across concurrent requests.

`instructrl serve reward --config reward.yaml server.port=50052` runs it (see docs/services.md).
"""
from __future__ import annotations

import asyncio
import logging
import sys

from instructrl.config import ConfigError, parse_cli
from instructrl.reward.config import RewardConfig
from instructrl.reward.normalization import RunningNormalizer, SavedNormalizer
from instructrl.reward.scorer import RewardScorer, ScoreInput, load_scorer
from instructrl.serving.batcher import DynamicBatcher, torch_threads
from instructrl.serving.errors import InvalidArgument
from instructrl.serving.server import GrpcServer
from instructrl.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = "instructrl.v1.RewardService"
log = logging.getLogger(__name__)


def _sequence(seq, where: str) -> str | list[int]:
    kind = seq.WhichOneof("kind")
    if kind == "text":
        return seq.text
    if kind == "token_ids":
        return list(seq.token_ids.ids)
    raise InvalidArgument(f"{where}: set text or token_ids")


def _input(item: reward_pb2.ScoreItem, k: int) -> ScoreInput:
    return ScoreInput(_sequence(item.prompt, f"items[{k}].prompt"),
                      _sequence(item.response, f"items[{k}].response"), dict(item.metadata))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, batcher: DynamicBatcher,
                 normalizer: RunningNormalizer | SavedNormalizer | None):
        self.scorer = scorer
        self.batcher = batcher
        self.normalizer = normalizer

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        items, lengths = self.scorer.prepare([_input(it, k) for k, it in enumerate(request.items)])
        raw = await self.batcher.submit(items, lengths, timeout=context.time_remaining())
        resp = reward_pb2.ScoreResponse(raw_scores=raw, scores=raw, model=self.scorer.name)
        if self.normalizer is not None:
            scores, stats = self.normalizer.apply(raw)
            resp.scores[:] = scores
            resp.normalization.CopyFrom(
                reward_pb2.NormalizationStats(mean=stats.mean, std=stats.std, count=stats.count))
        return resp


class RewardServer:
    """Scorer + batcher + gRPC server, started and stopped together (tests start it in-process)."""

    def __init__(self, cfg: RewardConfig, scorer: RewardScorer | None = None):
        self.cfg = cfg
        self.scorer = scorer if scorer is not None else load_scorer(cfg)
        norm = cfg.normalization
        self.normalizer: RunningNormalizer | SavedNormalizer | None = None
        if norm.enabled:
            self.normalizer = (SavedNormalizer.from_model_dir(cfg.model, norm.eps) if norm.source == "saved"
                               else RunningNormalizer(norm.freeze_after, norm.eps))
        self.batcher: DynamicBatcher | None = None
        self.grpc: GrpcServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else -1

    async def start(self) -> "RewardServer":
        self.batcher = await DynamicBatcher(self.scorer.forward, self.cfg.batching, "reward",
                                            torch_threads(self.cfg.torch_threads)).start()
        servicer = RewardServicer(self.scorer, self.batcher, self.normalizer)
        self.grpc = await GrpcServer("reward", self.cfg.server, [
            (reward_pb2_grpc.add_RewardServiceServicer_to_server, servicer, SERVICE_NAME)]).start()
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
    cfg = parse_cli("instructrl serve reward", RewardConfig, argv, __doc__.splitlines()[0], "server.port=50052")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        torch_threads(cfg.torch_threads)()
        server = RewardServer(cfg)  # loads the model before the port opens: SERVING means ready
    except ConfigError as e:
        print(f"instructrl serve reward: {e}", file=sys.stderr)
        return 2
    asyncio.run(server.serve_forever())
    return 0
