"""`instructrl rollout-worker`: prompts in, complete experience records out.

One loop per replica (CONVENTIONS 5: linear, numbered):

1. admission: wait until the learner's pacing rule admits a claim's worth of samples at
   this replica's weights version (docs/pacing.md: nothing is generated that would arrive
   too stale to train on; a replica too far behind re-registers at once, and the learner
   brings it to its weights);
2. claim up to `claim_batch` prompts (what was admitted) from the prompt stream
   (consumer = replica_id);
3. generate `sampling.n` samples per prompt on the rollout service (samples aborted by
   a weight update are generated again, at the new version);
4. in a background task, while the loop goes on with the next admission, claim and
   generation: score every sample (reward `Score`) and get its reference log-probs
   (reference `LogProbs`) concurrently, build `Experience` records tagged with the
   generating `policy_version` and the deterministic `sample_id_for(prompt_id, epoch,
   index)`, append them to the experience stream, release the admission, ack the prompts.

Only transient failures are retried (rollout/retry.py: UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, a lost Redis connection, a full buffer; classified by status code and
type), with capped exponential backoff, and the lease of the claimed prompts is renewed
meanwhile, so no prompt is taken over by another replica while this one waits. A batch's
calls get `retry.attempts` attempts; the loop's own calls (admission, claim, ack) wait for
Redis and the rollout service as long as it takes. A batch that fails for good is finished
again prompt by prompt, so a prompt that cannot succeed (its reward crashes the reward
model, say) fails alone: it is given back for redelivery and, once delivered
`buffer.max_deliveries` times, dead-lettered with its error (reason `failed`). A prompt the
rollout service rejects as INVALID_ARGUMENT (e.g. too long) is logged and acked without
experience (it can never succeed).

On SIGTERM (a scale-down) the worker unregisters from the learner at once, so the next
weight broadcast does not wait for it, stops claiming, and finishes the batches it holds
within `drain_timeout_s`; whatever is left unfinished is given back (prompts released for
other replicas at once, admissions released), and it exits 0.

Per-token data stays in its one encoding (`instructrl.codec`) from the Generate response to
the record: the token and log-prob tensors are copied into the `Experience`, not re-encoded.
The Redis clients are the buffer's synchronous ones, called through `asyncio.to_thread`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np

from instructrl.buffer import BufferConfig, ClaimedPrompts, ExperienceBuffer, PromptQueue, sample_id_for
from instructrl.buffer.pacing import Pacing, Refusal, Ticket
from instructrl.codec import logprobs, token_array
from instructrl.config import field, parse_cli
from instructrl.reference.client import ReferenceClient
from instructrl.reward.client import RewardClient
from instructrl.rollout import metrics as m
from instructrl.rollout.client import RolloutClient
from instructrl.rollout.domain import Sampling
from instructrl.rollout.retry import RetryConfig, Stopped, describe, retry
from instructrl.serving.client import ClientConfig, aio_channel
from instructrl.serving.metrics import start_metrics_server
from instructrl.v1 import common_pb2, experience_pb2, learner_pb2, learner_pb2_grpc, rollout_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
ADMISSION_POLL_S = 0.1  # longest wait between admission requests while the learner is full or ahead

@dataclasses.dataclass
class WorkerConfig:
    replica_id: str = field("rollout-0", help="consumer name in the prompt group; label of the metrics")
    rollout: ClientConfig = field(default_factory=ClientConfig, help="this replica's RolloutService")
    reward: ClientConfig = field(default_factory=ClientConfig, help="the reward service")
    reference: ClientConfig = field(default_factory=ClientConfig, help="the reference service")
    learner: ClientConfig = field(default_factory=lambda: ClientConfig(address=""),
                                  help="the learner, to register the replica with (empty address = do not)")
    rollout_advertise: str = field(
        "", help="host:port the learner reaches the RolloutService at (empty = rollout.address)")
    register_interval_s: float = field(30.0, help="re-register this often (a restarted learner forgets replicas)")
    buffer: BufferConfig = field(default_factory=BufferConfig, help="the Redis prompt and experience streams")
    sampling: Sampling = field(default_factory=lambda: Sampling(n=4), help="generation parameters")
    claim_batch: int = field(16, help="prompts claimed (and generated in one Generate call) at a time")
    max_pending: int = field(2, help="batches being scored/written while the next one generates")
    reward_input: str = field("tokens", help="what the reward service gets: tokens (ids) or text")
    generate_timeout_s: float = field(600.0, help="deadline of one Generate call")
    retry: RetryConfig = field(default_factory=RetryConfig, help="retries of transient failures (rollout/retry.py)")
    metrics_port: int = field(0, help="Prometheus /metrics port (0 = free, -1 = off)")
    max_batches: int = field(0, help="stop after this many batches (0 = run until stopped); for tests")
    drain_timeout_s: float = field(60.0, help="on SIGTERM: finish held batches for at most this long, then "
                                              "give the rest back and exit")

    def validate(self) -> None:
        if self.reward_input not in ("tokens", "text"):
            raise ValueError(f"reward_input: {self.reward_input!r} is not tokens/text")
        if self.claim_batch < 1 or self.max_pending < 1 or self.sampling.n < 1:
            raise ValueError("claim_batch, max_pending and sampling.n must be >= 1")
        if not self.sampling.temperature > 0:  # the records carry it; the learner divides by it
            raise ValueError(f"sampling.temperature: {self.sampling.temperature} must be > 0 (PPO trains on "
                             "sampled responses; greedy decoding has no log-probs to train on)")


@dataclasses.dataclass
class Generated:
    """One claimed batch after generation: per prompt, its result (None = rejected prompt)."""

    claimed: ClaimedPrompts
    results: list[rollout_pb2.PromptResult | None]
    versions: list[int]
    generate_s: float
    ticket: Ticket | None = None  # the admission its samples count against until written


@dataclasses.dataclass
class ToScore:
    """One completion to score, with its prompt's index in the batch and the decoded token ids."""

    i: int
    completion: rollout_pb2.Completion
    prompt_ids: np.ndarray    # (P,) int32
    response_ids: np.ndarray  # (T,) int32


def split(g: Generated) -> list[Generated]:
    """One `Generated` per prompt of `g` (without its admission ticket)."""
    c = g.claimed
    return [Generated(ClaimedPrompts(c.consumer, [c.prompts[i]], [c.entry_ids[i]]), [g.results[i]], [g.versions[i]],
                      g.generate_s) for i in range(len(c))]


def samples_of(g: Generated) -> list[ToScore]:
    """Every non-empty completion of a generated batch."""
    out = []
    for i, r in enumerate(g.results):
        if r is None:
            continue
        prompt = token_array(r.prompt_token_ids, "prompt_token_ids")
        for c in r.completions:
            response = token_array(c.token_ids, "completion.token_ids")
            if response.size:
                out.append(ToScore(i, c, prompt, response))
    return out


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.replica = cfg.replica_id
        self._register_now = asyncio.Event()
        self._held: dict[int, tuple[ClaimedPrompts, Ticket | None]] = {}  # claimed, not yet acked

    # -- 1. admission ----------------------------------------------------------
    async def admit(self) -> Ticket | None:
        """Wait until pacing admits up to `claim_batch` prompts' samples (None: stopping)."""
        n = self.cfg.sampling.n
        want, delay, last = self.cfg.claim_batch * n, 0.02, ""
        while not self.stop.is_set():
            version = (await retry("rollout status", self.rollout.status, self.cfg.retry, self.stop,
                                   bounded=False)).policy_version
            admit = functools.partial(asyncio.to_thread, self.pacing.admit, self.replica, version, want, n)
            got = await retry("admission", admit, self.cfg.retry, self.stop, bounded=False)
            if isinstance(got, Ticket):
                m.SAMPLES_ADMITTED.labels(self.replica).inc(got.samples)
                return got
            self._refused(got, version, last)
            if got.reason != last:  # a new situation: look again soon
                delay, last = 0.02, got.reason
            # full / stale clear at the learner's next step (its version, acks, a sync), so look again
            # soon: a long backoff here was the strict loop's wait (bench/loop.py); 5 s while it starts
            cap = ADMISSION_POLL_S if got.reason in ("full", "stale") else 5.0
            t0 = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            m.ADMISSION_WAIT.labels(self.replica, got.reason).inc(time.monotonic() - t0)
            delay = min(delay * 2, cap)
        return None

    def _refused(self, got: Refusal, version: int, last: str) -> None:
        if got.reason == "stale":  # weights too old to train on: ask the learner for the current ones
            self._register_now.set()
        if got.reason == last or got.reason == "full":
            return
        log.info("not claiming: %s (replica at v%d, learner at v%d)", {
            "no_learner": "the learner has not published its pacing state yet",
            "finished": "the learner finished its run",
            "stale": "these weights are more than pacing.max_policy_lag versions behind; catching up"}[got.reason],
            version, got.learner_version)

    # -- 2. generation ---------------------------------------------------------
    async def _generate(self, prompts: list[common_pb2.Sequence], ids: list[str]) -> rollout_pb2.GenerateResponse:
        return await retry("Generate", lambda: self.rollout.generate(
            prompts, self.cfg.sampling, ids, timeout_s=self.cfg.generate_timeout_s), self.cfg.retry, self.stop)

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
            for i, r in zip(todo, resp.results, strict=True):
                if any(c.finish_reason == "abort" for c in r.completions):
                    again.append(i)  # a weight update aborted it: generate it again, at the new version
                else:
                    results[i], versions[i] = r, resp.policy_version
            todo = again
        return Generated(claimed, results, versions, time.monotonic() - t0)

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
    def _reward_items(self, g: Generated, samples: list[ToScore]) -> list:
        items = []
        for s in samples:
            rec = g.claimed.prompts[s.i]
            meta = dict(rec.metadata)
            if self.cfg.reward_input == "text" and rec.prompt.WhichOneof("kind") == "text":
                items.append((rec.prompt.text, s.completion.text, meta))
            else:
                res = g.results[s.i]
                assert res is not None  # a sample exists only for a prompt that generated
                items.append((res.prompt_token_ids, s.completion.token_ids, meta))
        return items

    async def _timed(self, what: str, call: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        t = time.monotonic()
        out = await retry(what, call, self.cfg.retry, self.stop)
        return out, time.monotonic() - t

    def _records(self, g: Generated, samples: list[ToScore], score, raw, ref, timings) -> list:
        now_ms = int(time.time() * 1000)
        records = []
        for k, s in enumerate(samples):
            rec, res, c = g.claimed.prompts[s.i], g.results[s.i], s.completion
            assert res is not None  # a sample exists only for a prompt that generated
            records.append(experience_pb2.Experience(
                sample_id=sample_id_for(rec.prompt_id, rec.epoch, c.index), prompt_id=rec.prompt_id,
                prompt_token_ids=res.prompt_token_ids, response_token_ids=c.token_ids,
                finish_reason=c.finish_reason, sampling_logprobs=c.logprobs, policy_version=g.versions[s.i],
                temperature=self.cfg.sampling.temperature,
                ref_logprobs=logprobs(ref[k]), score=score[k], raw_score=raw[k], run_id=self.cfg.buffer.run_id,
                replica_id=self.replica, created_unix_ms=now_ms, timings=timings, sample_index=c.index))
        return records

    async def finish(self, g: Generated) -> int:
        samples = samples_of(g)
        records: list[experience_pb2.Experience] = []
        if samples:
            seqs = [np.concatenate([s.prompt_ids, s.response_ids]) for s in samples]
            starts = [s.prompt_ids.size for s in samples]
            ((score, raw), reward_s), (ref, reference_s) = await asyncio.gather(
                self._timed("Score", lambda: self.reward.score(self._reward_items(g, samples))),
                self._timed("LogProbs", lambda: self.reference.logprobs(
                    seqs, starts, temperature=self.cfg.sampling.temperature)))
            timings = common_pb2.Timings(generate_s=g.generate_s, reward_s=reward_s, reference_s=reference_s)
            records = self._records(g, samples, score, raw, ref, timings)
            await retry("experience put", lambda: asyncio.to_thread(self.experience.put, records),
                        self.cfg.retry, self.stop)
        if g.ticket is not None:  # after the put: the samples now count as records, not as admitted
            await self._release(g.ticket)
        await retry("prompt ack", lambda: asyncio.to_thread(self.prompts.ack, g.claimed), self.cfg.retry, self.stop,
                    bounded=False)
        m.PROMPTS_ACKED.labels(self.replica).inc(len(g.claimed))
        return len(records)

    async def _release(self, ticket: Ticket) -> None:
        await retry("admission release", lambda: asyncio.to_thread(self.pacing.release, ticket),
                    self.cfg.retry, self.stop, bounded=False)

    def _finished(self, lease: asyncio.Task, key: int, _task: asyncio.Task) -> None:
        """A batch is written (or given up): stop renewing its lease, forget it."""
        lease.cancel()
        self._held.pop(key, None)

    async def _finish_or_leave(self, g: Generated) -> int:
        """`finish`; when it fails for good, finish the prompts one by one, so that one that cannot
        succeed fails alone (`_fail`) and the rest are written. Returns the records written."""
        try:
            return await self.finish(g)
        except (Stopped, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - not transient, or out of attempts
            if len(g.claimed) == 1:
                await self._fail(g.claimed, g.ticket, e)
                return 0
            log.warning("batch of %d prompts failed (%s); finishing them one by one", len(g.claimed),
                        describe(e)[:300])
        written = 0
        for part in split(g):
            try:
                written += await self.finish(part)
            except (Stopped, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001
                await self._fail(part.claimed, None, e)
        if g.ticket is not None:  # the parts' samples are written or given back: none is admitted any more
            await self._release(g.ticket)
        return written

    async def _fail(self, claimed: ClaimedPrompts, ticket: Ticket | None, e: BaseException) -> None:
        """Give failed prompts back for redelivery (admitted anew then), or dead-letter them with the
        error once delivered `buffer.max_deliveries` times."""
        detail = describe(e)
        try:
            dead = await asyncio.to_thread(self.prompts.fail, claimed, detail)
        except Exception as err:  # noqa: BLE001 - Redis down: the leases expire instead
            log.warning("could not give back %d failed prompts: %s", len(claimed), err)
            dead = 0
        if ticket is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.pacing.release, ticket)
        m.PROMPTS_FAILED.labels(self.replica, "dead_lettered").inc(dead)
        m.PROMPTS_FAILED.labels(self.replica, "released").inc(len(claimed) - dead)
        log.error("prompt(s) %s failed: %s; %s", ", ".join(p.prompt_id for p in claimed.prompts[:4]), detail[:300],
                  f"{dead} dead-lettered, {len(claimed) - dead} given back for redelivery")

    async def _keep_lease(self, claimed: ClaimedPrompts, ticket: Ticket | None) -> None:
        """Renew the claim (and its admission) while the batch is worked on, so no other replica
        takes it over and the admission does not expire."""
        period = max(min(self.cfg.buffer.claim_idle_ms, self.pacing.ttl_ms) / 3000, 0.05)
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.prompts.touch, claimed)
                if ticket is not None:
                    await asyncio.to_thread(self.pacing.renew, [ticket])
            except Exception as e:  # noqa: BLE001 - Redis down: the retries elsewhere will wait for it
                log.debug("lease renewal failed: %s", e)

    async def _register(self) -> None:
        """Tell the learner where this replica serves and its weights' version (a replica behind
        the learner is caught up at once); repeated in case the learner restarted, and at once
        when admission finds the weights too stale."""
        addr = self.cfg.rollout_advertise or self.cfg.rollout.address
        channel = aio_channel(self.cfg.learner)
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        try:
            while True:
                wait = self.cfg.register_interval_s
                try:
                    version = (await self.rollout.status()).policy_version
                    await stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(
                        replica_id=self.replica, address=addr, policy_version=version), timeout=10)
                except grpc.aio.AioRpcError as e:
                    log.warning("registering with the learner at %s failed: %s", self.cfg.learner.address,
                                e.code().name)
                    wait = min(self.cfg.retry.cap_s, 2.0)
                await asyncio.sleep(min(wait, 2.0))  # at most one registration per 2 s
                self._register_now.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._register_now.wait(), max(wait - 2.0, 0.0))
        finally:
            await channel.close()

    async def _unregister(self) -> None:
        """Leave the learner's broadcast group now (a scale-down), so no sync waits for this replica."""
        channel = aio_channel(self.cfg.learner)
        try:
            await learner_pb2_grpc.LearnerServiceStub(channel).UnregisterRollout(
                learner_pb2.UnregisterRolloutRequest(replica_id=self.replica), timeout=5)
            log.info("unregistered from the learner")
        except grpc.aio.AioRpcError as e:
            log.warning("unregistering from the learner failed: %s", e.code().name)
        finally:
            await channel.close()

    # -- the loop ----------------------------------------------------------------
    async def run(self) -> int:
        """Connect, run the loop until stopped, drain on SIGTERM; returns the exit code (0)."""
        try:
            await self._connect()  # 0. the streams and groups are created if missing
        except Stopped:
            return 0
        background = [asyncio.ensure_future(self._register())] if self.cfg.learner.address else []
        loop = asyncio.ensure_future(self._loop())
        drain = asyncio.ensure_future(self._drain_when_stopped(loop))
        try:
            await loop
        except asyncio.CancelledError:
            log.warning("drain took longer than drain_timeout_s=%.0fs: giving the rest back", self.cfg.drain_timeout_s)
        finally:
            if self.stop.is_set():  # an idle loop ends at once: the drain still unregisters
                await asyncio.gather(drain, return_exceptions=True)
            for t in [drain, *background]:
                t.cancel()
            await asyncio.gather(drain, *background, return_exceptions=True)
            await self._give_back()
            await asyncio.gather(self.rollout.close(), self.reward.close(), self.reference.close(),
                                 return_exceptions=True)
            self.prompts.close()
            self.experience.close()
        return 0

    async def _connect(self) -> None:
        cfg = self.cfg
        self.prompts = await retry("prompt stream", lambda: asyncio.to_thread(PromptQueue.open, cfg.buffer),
                                   cfg.retry, self.stop, bounded=False)
        self.experience = await retry("experience stream", lambda: asyncio.to_thread(ExperienceBuffer.open, cfg.buffer),
                                      cfg.retry, self.stop, bounded=False)
        self.pacing = Pacing(self.experience.r, cfg.buffer.run_id)
        for reason in ("full", "stale", "no_learner", "finished"):  # every series from the start
            m.ADMISSION_WAIT.labels(self.replica, reason)
        for outcome in ("released", "dead_lettered"):
            m.PROMPTS_FAILED.labels(self.replica, outcome)
        m.SAMPLES_ADMITTED.labels(self.replica)
        self.rollout, self.reward = RolloutClient(cfg.rollout), RewardClient(cfg.reward)
        self.reference = ReferenceClient(cfg.reference)

    async def _loop(self) -> None:
        cfg = self.cfg
        pending: list[asyncio.Task] = []
        batches = 0
        try:
            while not self.stop.is_set() and not (cfg.max_batches and batches >= cfg.max_batches):
                ticket = await self.admit()  # 1. admission
                if ticket is None:
                    break
                claimed = await self._claim(ticket)  # 2. claim what was admitted
                if claimed is None:
                    continue
                ticket = self._held[id(claimed)][1]
                lease = asyncio.ensure_future(self._keep_lease(claimed, ticket))
                try:
                    generated = await self.generate(claimed)  # 3. generate
                except (Stopped, asyncio.CancelledError):
                    lease.cancel()
                    raise
                except Exception as e:  # noqa: BLE001 - failed for good: give the batch back
                    lease.cancel()
                    self._held.pop(id(claimed), None)
                    await self._fail(claimed, ticket, e)
                    continue
                generated.ticket = ticket
                # 4. score + reference + write + ack, overlapping the next admission and generation
                task = asyncio.ensure_future(self._finish_or_leave(generated))
                task.add_done_callback(functools.partial(self._finished, lease, id(claimed)))
                pending.append(task)
                batches += 1
                while len(pending) >= cfg.max_pending or (pending and pending[0].done()):
                    await pending.pop(0)
            for t in pending:
                await t
        except Stopped:
            log.info("stopped while waiting for a service")
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _claim(self, ticket: Ticket) -> ClaimedPrompts | None:
        """2. Claim as many prompts as `ticket` admits; shrink the ticket to what was claimed."""
        n = self.cfg.sampling.n
        claimed = await retry("prompt claim", lambda: asyncio.to_thread(
            self.prompts.claim, ticket.samples // n, self.replica), self.cfg.retry, self.stop, bounded=False)
        kept = await asyncio.to_thread(self.pacing.resize, ticket, len(claimed) * n)
        if not claimed.prompts:
            return None
        self._held[id(claimed)] = (claimed, kept)
        m.PROMPTS_CLAIMED.labels(self.replica).inc(len(claimed))
        return claimed

    async def _drain_when_stopped(self, loop: asyncio.Future) -> None:
        """On SIGTERM: leave the broadcast group, then give the loop drain_timeout_s to finish."""
        await self.stop.wait()
        if self.cfg.learner.address:
            await self._unregister()
        try:
            await asyncio.wait_for(asyncio.shield(loop), self.cfg.drain_timeout_s)
        except TimeoutError:
            loop.cancel()

    async def _give_back(self) -> None:
        """Release what is still held: its prompts to other replicas at once, its admissions."""
        held, self._held = list(self._held.values()), {}
        for claimed, ticket in held:
            try:
                await asyncio.to_thread(self.prompts.release, claimed)
                if ticket is not None:
                    await asyncio.to_thread(self.pacing.release, ticket)
            except Exception as e:  # noqa: BLE001 - Redis down: the leases expire instead
                log.warning("could not give back %d prompts: %s", len(claimed), e)
        if held:
            log.info("gave back %d unfinished batch(es)", len(held))


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
