"""What became of every experience record of a run on the bed: the scenarios' audit.

Two sources, read after the run:
- the learner's trained log (`metrics.jsonl` on its checkpoints claim, one line per iteration
  with the trained `sample_ids`: `logging.log_sample_ids`). A learner restarted from a
  checkpoint trains the iterations after it again and appends their lines anew, so the
  *final lineage* (the iterations that led to the final policy_version) is, per version, the
  line written last.
- the bundled Redis: the experience stream's `entries-added` (every record ever written, kept
  across a Redis restart by its AOF), its length (records never read), the `seen` hash (sample
  ids committed as trained) and the outcomes hash (`Keys.outcomes`: every entry deleted,
  counted under why, atomically with its deletion: committed, stale, duplicate,
  dead:<reason>), which no process restart can lose.

    acc = audit(redis_client, run_id, log_lines)
    print(acc.summary("scenario 4")); acc.check()
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import redis

from instructrl.buffer import Keys

# dead-letter reasons that mean the record itself is bad (buffer/validate.py), as opposed to
# delivered too often (max_deliveries: a learner died on it again and again)
INVALID = ("decode", "missing_field", "dtype", "shape", "non_finite", "range")


def final_lineage(lines: list[dict]) -> list[dict]:
    """Per policy_version up to the last one logged, the line written last (the log is append-only)."""
    by_version: dict[int, dict] = {}
    for line in lines:
        by_version[line["policy_version"]] = line
    if not by_version:
        return []
    final = lines[-1]["policy_version"]
    return [by_version[v] for v in sorted(by_version) if v <= final]


@dataclasses.dataclass
class Accounting:
    iterations: int  # the final policy_version
    written: int  # experience records ever appended (entries-added)
    trained: int  # distinct sample ids trained in the final lineage
    trained_twice: int  # sample ids trained more than once in the final lineage
    committed: int  # entries deleted as committed (acked after a checkpoint holding their update)
    dropped: dict[str, int]  # reason -> entries deleted without training (stale, duplicate, invalid, ...)
    unread: int  # entries still in the stream at the end (the run ended before it needed them)
    missing_from_seen: list[str]  # trained in the final lineage but never committed
    committed_not_trained: list[str]  # committed but in no line of the final lineage
    longest_sync_s: float  # longest weight broadcast of any iteration (every learner process)
    stall_s: float  # longest stretch between two trained iterations (every learner process)

    def summary(self, name: str) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{name}: {self.iterations} iterations; records written {self.written} / trained {self.trained} / "
                f"dropped {sum(self.dropped.values())} ({drops}) / unread {self.unread} / trained twice "
                f"{self.trained_twice}; longest weight sync {self.longest_sync_s:.2f}s; "
                f"training stall {self.stall_s:.1f}s")

    def check(self) -> None:
        """Nothing trained twice; every record written is trained, dropped with a reason, or unread."""
        assert self.trained_twice == 0, f"{self.trained_twice} sample(s) trained twice in the final lineage"
        accounted = self.committed + sum(self.dropped.values()) + self.unread
        assert self.written == accounted, (
            f"{self.written} records written but {accounted} accounted for (committed {self.committed}, "
            f"dropped {self.dropped}, unread {self.unread}): records vanished without a reason")
        assert not self.missing_from_seen, f"trained but never committed: {self.missing_from_seen[:10]}"
        assert not self.committed_not_trained, (
            f"committed as trained but in no iteration of the final lineage: {self.committed_not_trained[:10]}")
        assert self.trained == self.committed, f"trained {self.trained} != committed {self.committed}"


def outcomes(client: redis.Redis, run_id: str) -> dict[str, int]:
    keys = Keys.for_run(run_id)
    return {_text(k): int(v) for k, v in client.hgetall(keys.outcomes(keys.experience)).items()}


def _text(k: bytes | str) -> str:
    return k.decode() if isinstance(k, bytes) else k


def dropped_by_reason(out: dict[str, int]) -> dict[str, int]:
    """The outcomes other than `committed`, with the dead letters as `invalid` or `dead_lettered`."""
    dropped: Counter[str] = Counter()
    for reason, n in out.items():
        if reason == "committed":
            continue
        if reason.startswith("dead:"):
            reason = "invalid" if reason[5:] in INVALID else "dead_lettered"
        dropped[reason] += n
    return dict(dropped)


def iteration_gaps(lines: list[dict]) -> list[float]:
    times = sorted(line["time"] for line in lines if "time" in line)
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def audit(client: redis.Redis, run_id: str, lines: list[dict]) -> Accounting:
    keys = Keys.for_run(run_id)
    lineage = final_lineage(lines)
    counts = Counter(sid for line in lineage for sid in line.get("sample_ids", []))
    seen = {_text(k) for k in client.hkeys(keys.seen)}
    out = outcomes(client, run_id)
    info = client.xinfo_stream(keys.experience)
    return Accounting(
        iterations=lineage[-1]["policy_version"] if lineage else 0,
        written=int(info["entries-added"]), trained=len(counts),
        trained_twice=sum(1 for n in counts.values() if n > 1),
        committed=out.get("committed", 0), dropped=dropped_by_reason(out), unread=int(info["length"]),
        missing_from_seen=sorted(set(counts) - seen), committed_not_trained=sorted(seen - set(counts)),
        longest_sync_s=max((line.get("sync_seconds", 0.0) for line in lines), default=0.0),
        stall_s=max(iteration_gaps(lines), default=0.0))
