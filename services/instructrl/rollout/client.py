"""`RolloutClient`: an asyncio client of a rollout replica's Generate RPCs."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from instructrl.codec import TokenIds, sequence
from instructrl.rollout.domain import Sampling
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

SERVICE = "instructrl.v1.RolloutService"
Prompt = str | TokenIds | common_pb2.Sequence  # text, token ids, or a Sequence message


def sampling_message(s: Sampling) -> rollout_pb2.SamplingParams:
    """The wire form of `Sampling` (read back by the servicer)."""
    p = rollout_pb2.SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                   max_tokens=s.max_tokens, stop=list(s.stop),
                                   skip_special_tokens=s.skip_special_tokens)
    if s.seed is not None:
        p.seed = s.seed
    return p


def generate_request(prompts: Sequence[Prompt], sampling: Sampling,
                     prompt_ids: Sequence[str] | None = None) -> rollout_pb2.GenerateRequest:
    return rollout_pb2.GenerateRequest(prompts=[sequence(p) for p in prompts], params=sampling_message(sampling),
                                       prompt_ids=list(prompt_ids or []))


class RolloutClient:
    """Async client; `async with RolloutClient(cfg) as c: r = await c.generate(prompts, Sampling(n=4))`."""

    def __init__(self, cfg: ClientConfig, max_message_mb: int = 64):
        self.cfg = cfg
        self.channel = aio_channel(cfg, max_message_mb)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        await wait_healthy(self.channel, SERVICE, timeout_s)

    async def generate(self, prompts: Sequence[Prompt], sampling: Sampling,
                       prompt_ids: Sequence[str] | None = None,
                       timeout_s: float | None = None) -> rollout_pb2.GenerateResponse:
        return await self.stub.Generate(generate_request(prompts, sampling, prompt_ids),
                                        timeout=timeout_s or self.cfg.timeout_s)

    async def generate_stream(self, prompts: Sequence[Prompt], sampling: Sampling,
                              prompt_ids: Sequence[str] | None = None, timeout_s: float | None = None
                              ) -> AsyncIterator[rollout_pb2.GenerateStreamResponse]:
        call = self.stub.GenerateStream(generate_request(prompts, sampling, prompt_ids),
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
