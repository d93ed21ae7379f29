"""`instructrl serve rollout`: the RolloutService over a `RolloutEngine` (vLLM).

Each RPC converts proto -> domain, calls the engine, converts back; errors map
to status codes in the shared interceptor. Deadlines become the engine's
timeout, and a cancelled RPC cancels its task, which aborts its vLLM requests.
"""
from __future__ import annotations

import asyncio
import logging

from instructrl.codec import logprobs, sequence_value, tokens
from instructrl.config import parse_cli
from instructrl.rollout.config import RolloutConfig
from instructrl.rollout.domain import Sample, Sampling
from instructrl.rollout.vllm_engine import RolloutEngine
from instructrl.serving.errors import InvalidArgument
from instructrl.serving.server import GrpcServer
from instructrl.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "instructrl.v1.RolloutService"


def _prompts(req: rollout_pb2.GenerateRequest) -> list:
    out = [sequence_value(p, f"prompts[{i}]") for i, p in enumerate(req.prompts)]
    if req.prompt_ids and len(req.prompt_ids) != len(req.prompts):
        raise InvalidArgument(f"prompt_ids: {len(req.prompt_ids)} ids for {len(req.prompts)} prompts")
    return out


def _sampling(p: rollout_pb2.SamplingParams) -> Sampling:
    return Sampling(n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
                    stop=list(p.stop), seed=p.seed if p.HasField("seed") else None,
                    skip_special_tokens=p.skip_special_tokens)


def _completion(s: Sample) -> rollout_pb2.Completion:
    return rollout_pb2.Completion(token_ids=tokens(s.token_ids), logprobs=logprobs(s.logprobs),
                                  finish_reason=s.finish_reason, text=s.text, index=s.index)


def _timeout(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else max(left, 0.0)


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    async def Generate(self, request, context):
        res = await self.engine.generate(_prompts(request), _sampling(request.params), _timeout(context))
        ids = list(request.prompt_ids) or [""] * len(res.outputs)
        return rollout_pb2.GenerateResponse(policy_version=res.policy_version, results=[
            rollout_pb2.PromptResult(prompt_id=pid, prompt_token_ids=tokens(o.prompt_token_ids),
                                     completions=[_completion(s) for s in o.samples])
            for pid, o in zip(ids, res.outputs, strict=True)])

    async def GenerateStream(self, request, context):
        ids = list(request.prompt_ids)
        async for i, prompt_ids, sample, version in self.engine.generate_stream(
                _prompts(request), _sampling(request.params), _timeout(context)):
            yield rollout_pb2.GenerateStreamResponse(
                prompt_index=i, prompt_id=ids[i] if ids else "", prompt_token_ids=tokens(prompt_ids),
                completion=_completion(sample), policy_version=version)

    async def JoinWeightGroup(self, request, context):
        await self.engine.join_group(request.init_method, request.rank, request.world_size,
                                     request.backend or "gloo", request.timeout_s, request.group_id)
        return rollout_pb2.JoinWeightGroupResponse(group_id=request.group_id, rank=request.rank,
                                                   ranks=self.engine.ranks)

    async def UpdateWeights(self, request, context):
        limits = [t for t in (request.timeout_s or None, _timeout(context)) if t is not None]
        timeout = min(limits) if limits else 60.0
        r = await self.engine.update_weights(request.policy_version, request.manifest, request.group_id, timeout)
        return rollout_pb2.UpdateWeightsResponse(policy_version=r.policy_version, seconds=r.seconds, bytes=r.bytes)

    async def GetStatus(self, request, context):
        return rollout_pb2.RolloutStatus(**self.engine.status())


async def _exit_when_engine_dies(engine: RolloutEngine, server: GrpcServer) -> None:
    while not engine.dead:
        await asyncio.sleep(1.0)
    log.error("vLLM engine died; stopping the server so the replica is restarted")
    await server.stop(0)


async def serve(cfg: RolloutConfig, ready: asyncio.Event | None = None) -> int:
    """Start the engine, then the server; run until SIGTERM/SIGINT; drain, stop, shut vLLM down.

    Returns the exit code: 0 after a signal, 1 when vLLM's engine died.
    """
    engine = await RolloutEngine(cfg).start()
    server = GrpcServer("rollout", cfg.server, [
        (rollout_pb2_grpc.add_RolloutServiceServicer_to_server, RolloutServicer(engine), SERVICE)])
    try:
        await server.start()
        print(f"rollout {cfg.replica_id} serving on {cfg.server.host}:{server.port} "
              f"metrics :{server.metrics_port}", flush=True)
        if ready is not None:
            ready.set()
        watch = asyncio.ensure_future(_exit_when_engine_dies(engine, server))
        await server.wait()
        watch.cancel()
        return 1 if engine.dead else 0
    finally:
        await server.stop()
        engine.shutdown()


def main(argv: list[str]) -> int:
    cfg = parse_cli("instructrl serve rollout", RolloutConfig, argv, __doc__,
                    "engine.model=/models/sft server.port=50061")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(cfg))
