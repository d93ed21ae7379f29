"""Async client of the reward service, as rollout workers use it (retries belong to the caller)."""
from __future__ import annotations

from typing import Mapping, Sequence, Union

from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.v1 import common_pb2, reward_pb2, reward_pb2_grpc

Text = Union[str, Sequence[int]]
# (prompt, response) or (prompt, response, metadata); prompt/response as text or token ids
Item = Union[tuple[Text, Text], tuple[Text, Text, Mapping[str, str]]]


def _sequence(x: Text) -> common_pb2.Sequence:
    if isinstance(x, str):
        return common_pb2.Sequence(text=x)
    return common_pb2.Sequence(token_ids=common_pb2.TokenIds(ids=list(x)))


def score_request(items: Sequence[Item]) -> reward_pb2.ScoreRequest:
    out = []
    for it in items:
        metadata = it[2] if len(it) > 2 else {}
        out.append(reward_pb2.ScoreItem(prompt=_sequence(it[0]), response=_sequence(it[1]),
                                        metadata=dict(metadata)))
    return reward_pb2.ScoreRequest(items=out)


class RewardClient:
    """`scores, raw_scores = await RewardClient(cfg).score([(prompt, response), ...])`."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.channel = aio_channel(cfg)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    async def score(self, items: Sequence[Item], timeout: float | None = None) -> tuple[list[float], list[float]]:
        """Scores (normalised when the service normalises, else raw) and raw scores, in order."""
        resp = await self.stub.Score(score_request(items), timeout=timeout or self.cfg.timeout_s)
        return list(resp.scores), list(resp.raw_scores)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "RewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
