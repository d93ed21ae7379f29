"""Staleness-aware pacing: generation is admitted only while the learner can still train on it.

The one mechanism that keeps generation in step with training (docs/pacing.md). The learner
owns the setting (`pacing.max_policy_lag`, L) and publishes its state in Redis; every rollout
worker asks for admission before it claims prompts, so no replica runs ahead of the learner
and no sample is generated that would arrive too stale to train on.

The rule is AReaL's (Fu et al. 2025, "AReaL", sec. 5.1): with learner version v and batch
size B, at most (v + L + 1) * B samples may have been started. Counted as what is still
outstanding (started, neither trained in a finished iteration nor dropped):

    O = sum(admission tickets)                      generation in flight
      + XLEN(experience) - held                     written, not yet trained

(`held` = records the learner trained on in finished iterations but has not acked yet:
it acks at its checkpoints.) A replica whose weights are at version w <= v may start n
more samples iff

    O + n <= (L + 1 - (v - w)) * B

so with FIFO consumption every sample it starts is trained at a learner version <= w + L.
A replica more than L versions behind gets nothing until its weights catch up (the learner
brings a (re)joining replica to its version at once: `learner.control`). Tickets carry an
expiry that the worker renews with its prompt lease, so a worker that dies frees its share.

Everything that changes O runs in Redis: tickets are added by ADMIT_LUA, removed in the
same round trip as the records they became (`ExperienceBuffer.put(..., ticket=)`); records
leave XLEN when acked, dead-lettered or dropped, and `held` falls in the same transaction
as the ack. L = None admits without limit (only `buffer.capacity` applies).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import cast

import redis

from instructrl.buffer.config import Keys
from instructrl.buffer.scripts import ADMIT_LUA
from instructrl.config import field

TICKET_TTL_MS = 60_000

# ADMIT_LUA's refusals (its first reply element when < 0)
NO_LEARNER, FINISHED = -1, -2


STALE_POLICIES = ("drop", "keep")


@dataclasses.dataclass
class PacingConfig:
    """How stale experience may be: a learner setting, published to the workers through Redis."""

    max_policy_lag: int | None = field(
        1, help="most policy versions a trained record may trail the learner; generation is admitted "
                "only while it can arrive within this lag (null: no limit, no pacing)")
    stale_policy: str = field(
        "drop", help="records that arrive staler anyway (restarts): drop (ack, count in "
                     "instructrl_buffer_stale_dropped_total, re-queue their prompt) or keep (train on "
                     "them with their lag; see ppo.tis_cap)")

    def validate(self) -> None:
        if self.stale_policy not in STALE_POLICIES:
            raise ValueError(f"pacing.stale_policy: {self.stale_policy!r} is not drop/keep")
        if self.max_policy_lag is not None and self.max_policy_lag < 0:
            raise ValueError(f"pacing.max_policy_lag: {self.max_policy_lag} must be >= 0 (or null)")


@dataclasses.dataclass(frozen=True)
class LearnerState:
    """What the learner published: its version, the pacing rule, and how much it holds trained."""

    version: int
    max_policy_lag: int | None
    batch_size: int
    held: int
    finished: bool


@dataclasses.dataclass(frozen=True)
class Ticket:
    """Admission for `samples` samples, counted in Redis until they are written or released."""

    member: str
    samples: int
    learner_version: int


@dataclasses.dataclass(frozen=True)
class Refusal:
    """No admission now. reason: no_learner | finished | stale (replica too far behind) | full."""

    reason: str
    learner_version: int
    budget: int


def _member(samples: int, replica: str) -> str:
    return f"{samples}:{replica}:{uuid.uuid4().hex[:12]}"


def _resized(member: str, samples: int) -> str:
    return f"{samples}:{member.split(':', 1)[1]}"


class Pacing:
    """Redis I/O of the pacing state of one run (learner side and worker side)."""

    def __init__(self, client: redis.Redis, run_id: str, ticket_ttl_ms: int = TICKET_TTL_MS):
        self.r = client
        keys = Keys.for_run(run_id)
        self.state_key, self.tickets_key, self.stream_key = keys.pacing, keys.admitted, keys.experience
        self.ttl_ms = int(ticket_ttl_ms)
        self._admit = client.register_script(ADMIT_LUA)

    # -- learner side ----------------------------------------------------------
    def publish(self, version: int, max_policy_lag: int | None, batch_size: int, held: int,
                finished: bool = False) -> None:
        """State after start-up or an iteration: version, rule, records held trained and unacked."""
        self.r.hset(self.state_key, mapping={
            "version": int(version), "max_policy_lag": "none" if max_policy_lag is None else int(max_policy_lag),
            "batch_size": int(batch_size), "held": int(held), "finished": int(finished),
            "updated_ms": int(time.time() * 1000)})

    def released_in(self, pipe, acked: int) -> None:
        """Queue `held -= acked` into the pipeline (MULTI) that acks those records."""
        pipe.hincrby(self.state_key, "held", -int(acked))

    def state(self) -> LearnerState | None:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.state_key))
        if not raw:
            return None
        get = lambda k: raw.get(k.encode(), b"0").decode()  # noqa: E731
        lag = get("max_policy_lag")
        return LearnerState(int(get("version")), None if lag == "none" else int(lag), int(get("batch_size")),
                            int(get("held")), get("finished") == "1")

    def outstanding(self) -> int:
        """O: samples admitted or written and not yet trained (the quantity the rule bounds)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zremrangebyscore(self.tickets_key, "-inf", int(time.time() * 1000))
        pipe.zrange(self.tickets_key, 0, -1)
        pipe.xlen(self.stream_key)
        pipe.hget(self.state_key, "held")
        _, members, xlen, held = pipe.execute()
        return sum(int(m.split(b":", 1)[0]) for m in members) + int(xlen) - int(held or 0)

    # -- worker side -----------------------------------------------------------
    def admit(self, replica: str, replica_version: int, want: int, granularity: int = 1) -> Ticket | Refusal:
        """Ask to start up to `want` samples (a multiple of `granularity`, the samples of one prompt)
        with weights at `replica_version`. Grants a multiple of `granularity` or refuses."""
        if want < 1 or granularity < 1:
            raise ValueError("want and granularity must be >= 1")
        suffix = _member(0, replica).split(":", 1)[1]
        grant, budget, version, stale = self._admit(
            keys=[self.state_key, self.tickets_key, self.stream_key],
            args=[int(replica_version), int(want), int(granularity), suffix, self.ttl_ms])
        if grant > 0:
            return Ticket(f"{grant}:{suffix}", int(grant), int(version))
        reason = {NO_LEARNER: "no_learner", FINISHED: "finished"}.get(grant) or ("stale" if stale else "full")
        return Refusal(reason, int(version), int(budget))

    def resize(self, ticket: Ticket, samples: int) -> Ticket | None:
        """Shrink a ticket to the samples actually started (None: release it all)."""
        if samples >= ticket.samples:
            return ticket
        pipe = self.r.pipeline(transaction=True)
        pipe.zscore(self.tickets_key, ticket.member)
        pipe.zrem(self.tickets_key, ticket.member)
        score, _ = pipe.execute()
        if samples <= 0 or score is None:
            return None
        member = _resized(ticket.member, samples)
        self.r.zadd(self.tickets_key, {member: score})
        return Ticket(member, samples, ticket.learner_version)

    def renew(self, tickets: list[Ticket]) -> None:
        """Push the expiry of live tickets forward (with the prompt lease); never revives one."""
        if tickets:
            expiry = int(time.time() * 1000) + self.ttl_ms
            self.r.zadd(self.tickets_key, {t.member: expiry for t in tickets}, xx=True)

    def release(self, ticket: Ticket, pipe=None) -> None:
        """Drop a ticket: its samples were written (queue this after their XADDs) or abandoned."""
        (pipe or self.r).zrem(self.tickets_key, ticket.member)
