"""`RolloutClient`: an asyncio client of a rollout replica's Generate RPCs."""
from __future__ import annotations

from typing import AsyncIterator, Sequence

from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

SERVICE = "instructrl.v1.RolloutService"


def sequence(p: str | Sequence[int]) -> common_pb2.Sequence:
    """A prompt as a `Sequence` message: text or token ids."""
    if isinstance(p, str):
        return common_pb2.Sequence(text=p)
    return common_pb2.Sequence(token_ids=common_pb2.TokenIds(ids=list(p)))


def sampling_params(n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    max_tokens: int = 64, stop: Sequence[str] = (), seed: int | None = None,
                    skip_special_tokens: bool = True) -> rollout_pb2.SamplingParams:
    p = rollout_pb2.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                   max_tokens=max_tokens, stop=list(stop),
                                   skip_special_tokens=skip_special_tokens)
    if seed is not None:
        p.seed = seed
    return p


class RolloutClient:
    """Async client; `async with RolloutClient(cfg) as c: r = await c.generate(prompts, params)`."""

    def __init__(self, cfg: ClientConfig, max_message_mb: int = 64):
        self.cfg = cfg
        self.channel = aio_channel(cfg, max_message_mb)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)

    async def __aenter__(self) -> "RolloutClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        await wait_healthy(self.channel, SERVICE, timeout_s)

    def _request(self, prompts, params, prompt_ids) -> rollout_pb2.GenerateRequest:
        return rollout_pb2.GenerateRequest(prompts=[sequence(p) for p in prompts], params=params,
                                           prompt_ids=list(prompt_ids or []))

    async def generate(self, prompts: Sequence[str | Sequence[int]], params: rollout_pb2.SamplingParams,
                       prompt_ids: Sequence[str] | None = None,
                       timeout_s: float | None = None) -> rollout_pb2.GenerateResponse:
        return await self.stub.Generate(self._request(prompts, params, prompt_ids),
                                        timeout=timeout_s or self.cfg.timeout_s)

    async def generate_stream(self, prompts: Sequence[str | Sequence[int]], params: rollout_pb2.SamplingParams,
                              prompt_ids: Sequence[str] | None = None, timeout_s: float | None = None
                              ) -> AsyncIterator[rollout_pb2.GenerateStreamResponse]:
        call = self.stub.GenerateStream(self._request(prompts, params, prompt_ids),
                                        timeout=timeout_s or self.cfg.timeout_s)
        try:
            async for item in call:
                yield item
        finally:
            call.cancel()

    async def status(self, timeout_s: float = 10.0) -> rollout_pb2.RolloutStatus:
        return await self.stub.GetStatus(rollout_pb2.GetRolloutStatusRequest(), timeout=timeout_s)

    async def close(self) -> None:
        await self.channel.close()
