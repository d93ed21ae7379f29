"""Async client of the reward service, as rollout workers use it (retries belong to the caller)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from instructrl.codec import TokenIds, sequence
from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.v1 import common_pb2, reward_pb2, reward_pb2_grpc

Text = str | TokenIds | common_pb2.Tensor
# (prompt, response) or (prompt, response, metadata); prompt/response as text, token ids or a token Tensor
Item = tuple[Text, Text] | tuple[Text, Text, Mapping[str, str]]


def score_request(items: Sequence[Item]) -> reward_pb2.ScoreRequest:
    out = []
    for it in items:
        metadata = it[2] if len(it) > 2 else {}
        out.append(reward_pb2.ScoreItem(prompt=sequence(it[0]), response=sequence(it[1]),
                                        metadata=dict(metadata)))
    return reward_pb2.ScoreRequest(items=out)


class RewardClient:
    """`scores, raw_scores = await RewardClient(cfg).score([(prompt, response), ...])`."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.channel = aio_channel(cfg, balanced=True)  # round_robin over the service's pods
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    async def score(self, items: Sequence[Item], timeout: float | None = None) -> tuple[list[float], list[float]]:
        """Scores (normalised when the service normalises, else raw) and raw scores, in order."""
        resp = await self.stub.Score(score_request(items), timeout=timeout or self.cfg.timeout_s)
        return list(resp.scores), list(resp.raw_scores)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
