"""The reward service: `RewardService.Score` over `scorer.py`, batched across concurrent requests.

`instructrl serve reward --config reward.yaml server.port=50052` runs it (see docs/services.md).
"""
from __future__ import annotations

from instructrl.codec import sequence_value
from instructrl.reward.config import RewardConfig
from instructrl.reward.normalization import RunningNormalizer, SavedNormalizer
from instructrl.reward.scorer import RewardScorer, ScoreInput, load_scorer
from instructrl.serving import scoring
from instructrl.serving.batcher import DynamicBatcher
from instructrl.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = "instructrl.v1.RewardService"
Normalizer = RunningNormalizer | SavedNormalizer


def _input(item: reward_pb2.ScoreItem, k: int) -> ScoreInput:
    return ScoreInput(sequence_value(item.prompt, f"items[{k}].prompt"),
                      sequence_value(item.response, f"items[{k}].response"), dict(item.metadata))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, batcher: DynamicBatcher, normalizer: Normalizer | None):
        self.scorer, self.batcher, self.normalizer = scorer, batcher, normalizer

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        raw = await scoring.score(self.scorer, self.batcher,
                                  [_input(it, k) for k, it in enumerate(request.items)], context)
        resp = reward_pb2.ScoreResponse(raw_scores=raw, scores=raw, model=self.scorer.name)
        if self.normalizer is not None:
            scores, stats = self.normalizer.apply(raw)
            resp.scores[:] = scores
            resp.normalization.CopyFrom(
                reward_pb2.NormalizationStats(mean=stats.mean, std=stats.std, count=stats.count))
        return resp


def reward_server(cfg: RewardConfig, scorer: RewardScorer | None = None) -> scoring.ScoringServer:
    """The reward service, not started (loads the model unless `scorer` is given)."""
    scorer = scorer if scorer is not None else load_scorer(cfg)
    norm, normalizer = cfg.normalization, None
    if norm.enabled:
        normalizer = (SavedNormalizer.from_model_dir(cfg.model, norm.eps) if norm.source == "saved"
                      else RunningNormalizer(norm.freeze_after, norm.eps))
    return scoring.ScoringServer("reward", scorer, cfg.server, cfg.batching, cfg.torch_threads,
                                 lambda batcher: RewardServicer(scorer, batcher, normalizer),
                                 reward_pb2_grpc.add_RewardServiceServicer_to_server, SERVICE_NAME)


def main(argv: list[str]) -> int:
    return scoring.main("instructrl serve reward", RewardConfig, argv, __doc__.splitlines()[0],
                        "server.port=50052", reward_server)
