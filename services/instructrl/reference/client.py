"""Async client of the reference service, as rollout workers use it (retries belong to the caller)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from instructrl.codec import TokenIds, logprob_array, tokens
from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.v1 import reference_pb2, reference_pb2_grpc


class ReferenceClient:
    """`logprobs = await ReferenceClient(cfg).logprobs([prompt + response, ...], [len(prompt), ...])`."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.channel = aio_channel(cfg, balanced=True)  # round_robin over the service's pods
        self.stub = reference_pb2_grpc.ReferenceServiceStub(self.channel)

    async def logprobs(self, token_ids_list: Sequence[TokenIds], response_starts: Sequence[int],
                       timeout: float | None = None, temperature: float = 1.0) -> list[np.ndarray]:
        """Per sequence, the float32 (T,) log-probs of its tokens from `response_start` on, at
        `temperature` (the one the responses were sampled at: log_softmax(logits / temperature)).
        Raises `ValueError` when the service answers with the wrong number of them."""
        if len(token_ids_list) != len(response_starts):
            raise ValueError("token_ids_list and response_starts differ in length")
        req = reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(token_ids=tokens(ids), response_start=s)
            for ids, s in zip(token_ids_list, response_starts, strict=True)], temperature=temperature)
        resp = await self.stub.LogProbs(req, timeout=timeout or self.cfg.timeout_s)
        out = [logprob_array(r.logprobs, f"results[{k}].logprobs") for k, r in enumerate(resp.results)]
        want = [len(ids) - s for ids, s in zip(token_ids_list, response_starts, strict=True)]
        if [a.size for a in out] != want:
            raise ValueError(f"reference answered {[a.size for a in out]} log-probs for {want} response tokens")
        return out

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ReferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
