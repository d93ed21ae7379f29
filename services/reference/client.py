"""Async client of the reference service, as rollout workers use it (retries belong to the caller)."""
from __future__ import annotations

from typing import Sequence

from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.v1 import reference_pb2, reference_pb2_grpc


class ReferenceClient:
    """`logprobs = await ReferenceClient(cfg).logprobs([prompt + response, ...], [len(prompt), ...])`."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.channel = aio_channel(cfg)
        self.stub = reference_pb2_grpc.ReferenceServiceStub(self.channel)

    async def logprobs(self, token_ids_list: Sequence[Sequence[int]], response_starts: Sequence[int],
                       timeout: float | None = None) -> list[list[float]]:
        """Per sequence, the log-probs of its tokens from `response_start` on (float32 values)."""
        if len(token_ids_list) != len(response_starts):
            raise ValueError("token_ids_list and response_starts differ in length")
        req = reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(token_ids=list(ids), response_start=s)
            for ids, s in zip(token_ids_list, response_starts)])
        resp = await self.stub.LogProbs(req, timeout=timeout or self.cfg.timeout_s)
        return [list(r.logprobs) for r in resp.results]

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "ReferenceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
