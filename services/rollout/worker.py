"""`instructrl rollout-worker`: prompts in, complete experience records out.

One loop per replica (CONVENTIONS 5: linear, numbered):

1. claim up to `claim_batch` prompts from the prompt stream (consumer = replica_id);
2. generate `sampling.n` samples per prompt on the rollout service (samples aborted by
   a weight update are generated again, at the new version);
3. in a background task, while the loop goes on with the next claim and generation:
   score every sample (reward `Score`) and get its reference log-probs (reference
   `LogProbs`) concurrently, build `Experience` records tagged with the generating
   `policy_version` and the deterministic `sample_id_for(prompt_id, epoch, index)`,
   append them to the experience stream, and ack the prompts.

Every remote call is retried with capped exponential backoff while its service is down
(UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...; Redis errors and a full
buffer likewise), and the lease of the claimed prompts is renewed meanwhile, so no
prompt is lost and none is taken over by another replica while this one waits. A prompt
the rollout service rejects as INVALID_ARGUMENT (e.g. too long) is logged and acked
without experience (it can never succeed). On SIGTERM the worker stops claiming and
finishes the batches it holds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import time
from typing import Awaitable, Callable, TypeVar

import grpc
import numpy as np

from instructrl.buffer import AsyncExperienceBuffer, AsyncPromptQueue, BufferConfig, ClaimedPrompts, sample_id_for
from instructrl.codec import encode
from instructrl.config import field, parse_cli
from instructrl.reference.client import ReferenceClient
from instructrl.reward.client import RewardClient
from instructrl.rollout import metrics as m
from instructrl.rollout.client import RolloutClient, sampling_params
from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.serving.metrics import start_metrics_server
from instructrl.v1 import common_pb2, experience_pb2, learner_pb2, learner_pb2_grpc, rollout_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}


@dataclasses.dataclass
class SamplingConfig:
    n: int = field(4, help="samples per prompt")
    temperature: float = field(1.0, help="sampling temperature (0 = greedy)")
    top_p: float = field(1.0, help="nucleus sampling mass")
    top_k: int = field(0, help="top-k sampling (0 = off)")
    max_tokens: int = field(64, help="most tokens per response")
    stop: list[str] = field(default_factory=list, help="stop strings")


@dataclasses.dataclass
class RetryConfig:
    base_s: float = field(0.2, help="first backoff after a failed call")
    cap_s: float = field(10.0, help="longest backoff")
    attempts: int = field(0, help="attempts per call before giving up (0 = until the service is back)")


@dataclasses.dataclass
class WorkerConfig:
    replica_id: str = field("rollout-0", help="consumer name in the prompt group; label of the metrics")
    rollout: ClientConfig = field(default_factory=ClientConfig, help="this replica's RolloutService")
    reward: ClientConfig = field(default_factory=ClientConfig, help="the reward service")
    reference: ClientConfig = field(default_factory=ClientConfig, help="the reference service")
    learner: ClientConfig = field(default_factory=lambda: ClientConfig(address=""),
                                  help="the learner, to register the replica with (empty address = do not)")
    rollout_advertise: str = field("", help="host:port the learner reaches the RolloutService at (empty = rollout.address)")
    register_interval_s: float = field(30.0, help="re-register this often (a restarted learner forgets replicas)")
    buffer: BufferConfig = field(default_factory=BufferConfig, help="the Redis prompt and experience streams")
    sampling: SamplingConfig = field(default_factory=SamplingConfig, help="generation parameters")
    claim_batch: int = field(16, help="prompts claimed (and generated in one Generate call) at a time")
    max_pending: int = field(2, help="batches being scored/written while the next one generates")
    reward_input: str = field("tokens", help="what the reward service gets: tokens (ids) or text")
    generate_timeout_s: float = field(600.0, help="deadline of one Generate call")
    retry: RetryConfig = field(default_factory=RetryConfig, help="backoff of calls to services that are down")
    metrics_port: int = field(0, help="Prometheus /metrics port (0 = free, -1 = off)")
    max_batches: int = field(0, help="stop after this many batches (0 = run until stopped); for tests")

    def validate(self) -> None:
        if self.reward_input not in ("tokens", "text"):
            raise ValueError(f"reward_input: {self.reward_input!r} is not tokens/text")
        if self.claim_batch < 1 or self.max_pending < 1 or self.sampling.n < 1:
            raise ValueError("claim_batch, max_pending and sampling.n must be >= 1")


class Stopped(Exception):
    """The worker was asked to stop while waiting for a service."""


def _retryable(e: BaseException) -> bool:
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code() in RETRYABLE
    return isinstance(e, (ConnectionError, TimeoutError, OSError)) or type(e).__module__.startswith("redis")


async def retry(what: str, fn: Callable[[], Awaitable[T]], cfg: RetryConfig, stop: asyncio.Event) -> T:
    """`await fn()` until it succeeds, backing off (with jitter) after retryable errors."""
    delay, attempt = cfg.base_s, 0
    while True:
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - classified below
            attempt += 1
            if not _retryable(e) or (cfg.attempts and attempt >= cfg.attempts):
                raise
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            log.warning("%s failed (attempt %d, retrying in %.1fs): %s", what, attempt, delay, detail[:300])
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
            raise Stopped(what)
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, cfg.cap_s)


@dataclasses.dataclass
class Generated:
    """One claimed batch after generation: per prompt, its result (None = rejected prompt)."""

    claimed: ClaimedPrompts
    results: list[rollout_pb2.PromptResult | None]
    versions: list[int]
    generate_s: float
    claimed_at: float


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.replica = cfg.replica_id

    # -- 2. generation ---------------------------------------------------------
    async def _generate(self, prompts: list[common_pb2.Sequence], ids: list[str]) -> rollout_pb2.GenerateResponse:
        s = self.cfg.sampling
        req = rollout_pb2.GenerateRequest(prompts=prompts, prompt_ids=ids, params=sampling_params(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, stop=s.stop))
        return await retry("Generate", lambda: self.rollout.stub.Generate(req, timeout=self.cfg.generate_timeout_s),
                           self.cfg.retry, self.stop)

    async def generate(self, claimed: ClaimedPrompts) -> Generated:
        t0 = time.monotonic()
        n = len(claimed.prompts)
        results: list[rollout_pb2.PromptResult | None] = [None] * n
        versions = [0] * n
        todo = list(range(n))
        while todo:
            try:
                resp = await self._generate([claimed.prompts[i].prompt for i in todo],
                                            [claimed.prompts[i].prompt_id for i in todo])
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                if len(todo) > 1:  # find the bad prompt(s): one request each
                    for i in todo:
                        one = await self._generate_one(claimed.prompts[i])
                        results[i], versions[i] = one if one else (None, 0)
                    break
                log.error("prompt %s rejected by the rollout service: %s; acking it without experience",
                          claimed.prompts[todo[0]].prompt_id, e.details())
                break
            again = []
            for i, r in zip(todo, resp.results):
                if any(c.finish_reason == "abort" for c in r.completions):
                    again.append(i)  # a weight update aborted it: generate it again, at the new version
                else:
                    results[i], versions[i] = r, resp.policy_version
            todo = again
        return Generated(claimed, results, versions, time.monotonic() - t0, t0)

    async def _generate_one(self, prompt: experience_pb2.PromptRecord):
        while True:
            try:
                resp = await self._generate([prompt.prompt], [prompt.prompt_id])
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                log.error("prompt %s rejected by the rollout service: %s; acking it without experience",
                          prompt.prompt_id, e.details())
                return None
            r = resp.results[0]
            if not any(c.finish_reason == "abort" for c in r.completions):
                return r, resp.policy_version

    # -- 3. score, reference, write, ack ---------------------------------------
    def _reward_items(self, g: Generated, samples) -> list:
        items = []
        for i, c in samples:
            rec, res = g.claimed.prompts[i], g.results[i]
            meta = dict(rec.metadata)
            if self.cfg.reward_input == "text" and rec.prompt.WhichOneof("kind") == "text":
                items.append((rec.prompt.text, c.text, meta))
            else:
                items.append((list(res.prompt_token_ids), list(c.token_ids), meta))
        return items

    async def finish(self, g: Generated) -> int:
        samples = [(i, c) for i, r in enumerate(g.results) if r is not None for c in r.completions
                   if len(c.token_ids) > 0]
        records: list[experience_pb2.Experience] = []
        if samples:
            async def scores():
                t = time.monotonic()
                out = await retry("Score", lambda: self.reward.score(self._reward_items(g, samples)),
                                  self.cfg.retry, self.stop)
                return out, time.monotonic() - t

            async def ref_logprobs():
                t = time.monotonic()
                seqs = [list(g.results[i].prompt_token_ids) + list(c.token_ids) for i, c in samples]
                starts = [len(g.results[i].prompt_token_ids) for i, _ in samples]
                out = await retry("LogProbs", lambda: self.reference.logprobs(seqs, starts), self.cfg.retry, self.stop)
                return out, time.monotonic() - t

            ((score, raw), reward_s), (ref, reference_s) = await asyncio.gather(scores(), ref_logprobs())
            now_ms = int(time.time() * 1000)
            timings = common_pb2.Timings(generate_s=g.generate_s, reward_s=reward_s, reference_s=reference_s,
                                         queue_s=0.0)
            for k, (i, c) in enumerate(samples):
                rec, res = g.claimed.prompts[i], g.results[i]
                records.append(experience_pb2.Experience(
                    sample_id=sample_id_for(rec.prompt_id, rec.epoch, c.index), prompt_id=rec.prompt_id,
                    prompt_token_ids=encode(np.asarray(res.prompt_token_ids, dtype=np.int32)),
                    response_token_ids=encode(np.asarray(c.token_ids, dtype=np.int32)),
                    finish_reason=c.finish_reason,
                    sampling_logprobs=encode(np.asarray(c.logprobs, dtype=np.float32)),
                    policy_version=g.versions[i],
                    ref_logprobs=encode(np.asarray(ref[k], dtype=np.float32)),
                    score=score[k], raw_score=raw[k], run_id=self.cfg.buffer.run_id, replica_id=self.replica,
                    created_unix_ms=now_ms, timings=timings, sample_index=c.index))
            await retry("experience put", lambda: self.experience.put(records), self.cfg.retry, self.stop)
        await retry("prompt ack", lambda: self.prompts.ack(g.claimed), self.cfg.retry, self.stop)
        m.PROMPTS_ACKED.labels(self.replica).inc(len(g.claimed))
        return len(records)

    async def _finish_or_leave(self, g: Generated) -> int:
        """`finish`, but a non-retryable failure leaves the prompts unacked (redelivered later,
        dead-lettered after `buffer.max_deliveries`) instead of stopping the worker."""
        try:
            return await self.finish(g)
        except (Stopped, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            log.error("batch of %d prompts (%s, ...) failed: %s; leaving it for redelivery", len(g.claimed),
                      g.claimed.prompts[0].prompt_id, detail[:300])
            return 0

    async def _keep_lease(self, claimed: ClaimedPrompts) -> None:
        """Renew the claim while the batch is worked on, so no other replica takes it over."""
        period = max(self.cfg.buffer.claim_idle_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(period)
            try:
                await self.prompts.touch(claimed)
            except Exception as e:  # noqa: BLE001 - Redis down: the retries elsewhere will wait for it
                log.debug("lease renewal failed: %s", e)

    async def _register(self) -> None:
        """Tell the learner where this replica serves; repeated in case the learner restarted."""
        addr = self.cfg.rollout_advertise or self.cfg.rollout.address
        req = learner_pb2.RegisterRolloutRequest(replica_id=self.replica, address=addr)
        channel = aio_channel(self.cfg.learner)
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        try:
            while True:
                try:
                    await stub.RegisterRollout(req, timeout=10)
                except grpc.aio.AioRpcError as e:
                    log.warning("registering with the learner at %s failed: %s", self.cfg.learner.address,
                                e.code().name)
                    await asyncio.sleep(min(self.cfg.retry.cap_s, 2.0))
                    continue
                await asyncio.sleep(self.cfg.register_interval_s)
        finally:
            await channel.close()

    # -- the loop ----------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        # 0. connect (the streams and groups are created if missing)
        self.prompts = await retry("prompt stream", lambda: AsyncPromptQueue.open(cfg.buffer), cfg.retry, self.stop)
        self.experience = await retry("experience stream", lambda: AsyncExperienceBuffer.open(cfg.buffer),
                                      cfg.retry, self.stop)
        self.rollout, self.reward = RolloutClient(cfg.rollout), RewardClient(cfg.reward)
        self.reference = ReferenceClient(cfg.reference)
        background = [asyncio.ensure_future(self._register())] if cfg.learner.address else []
        pending: list[asyncio.Task] = []
        batches = 0
        try:
            while not self.stop.is_set() and not (cfg.max_batches and batches >= cfg.max_batches):
                # 1. claim
                claimed = await retry("prompt claim", lambda: self.prompts.claim(cfg.claim_batch, self.replica),
                                      cfg.retry, self.stop)
                if not claimed.prompts:
                    continue
                m.PROMPTS_CLAIMED.labels(self.replica).inc(len(claimed))
                lease = asyncio.ensure_future(self._keep_lease(claimed))
                try:
                    # 2. generate
                    generated = await self.generate(claimed)
                except BaseException:
                    lease.cancel()
                    raise
                # 3. score + reference + write + ack, overlapping the next generation
                task = asyncio.ensure_future(self._finish_or_leave(generated))
                task.add_done_callback(lambda _t, lease=lease: lease.cancel())
                pending.append(task)
                batches += 1
                while len(pending) >= cfg.max_pending or (pending and pending[0].done()):
                    await pending.pop(0)
            for t in pending:
                await t
        except Stopped:
            log.info("stopping: prompts not acked are taken over by another replica after claim_idle_ms")
        finally:
            for t in pending + background:
                t.cancel()
            await asyncio.gather(*pending, *background, return_exceptions=True)
            await asyncio.gather(self.rollout.close(), self.reward.close(), self.reference.close(),
                                 self.prompts.close(), self.experience.close(), return_exceptions=True)
        return 0


def main(argv: list[str]) -> int:
    cfg = parse_cli("instructrl rollout-worker", WorkerConfig, argv, __doc__.splitlines()[0],
                    "rollout.address=127.0.0.1:50061")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = start_metrics_server(cfg.metrics_port)
    log.info("rollout worker %s: rollout %s, reward %s, reference %s, metrics :%d", cfg.replica_id,
             cfg.rollout.address, cfg.reward.address, cfg.reference.address, port)

    async def run() -> int:
        worker = RolloutWorker(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop.set)
        return await worker.run()
    return asyncio.run(run())
