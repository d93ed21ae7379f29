"""What `instructrl launch` prints: a progress line per iteration, a stale-drop warning, a summary.

Everything here is a pure function of snapshots (the learner's JSONL record of an iteration and
its `GetStatus` answer as a dict), so it is tested without a run; `Console` only decides where
the text goes: on a terminal one bar redrawn in place, elsewhere (a log file, CI) one plain line
per iteration.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, TextIO

STALE_WARN_FRACTION = 0.5  # warn when more than this share of the experience read was dropped ...
STALE_WARN_WINDOW = 3      # ... over the last this many iterations


@dataclasses.dataclass
class Snapshot:
    """One iteration as the launcher sees it (the JSONL record + the learner's status)."""

    version: int
    max_iterations: int  # 0 = no limit
    score: float  # the reward model's (or rule's) score, the batch mean
    reward: float  # score - kl_coef * KL, summed over the response, the batch mean
    kl: float  # KL(actor || SFT) per sequence, the batch mean
    kl_coef: float
    samples_trained: int  # this run's lineage
    stale_dropped: int  # this learner process
    policy_lag: float  # mean lag of the batch trained
    time: float  # the record's wall time (s)
    buffer_depth: int = -1  # -1: unknown (no status)
    replicas: int = -1
    max_policy_lag: int = -2  # -1: pacing off, -2: unknown


def snapshot(record: dict[str, Any], status: dict[str, Any] | None = None, max_iterations: int = 0) -> Snapshot:
    """A `Snapshot` from a learner JSONL record and (optionally) its `GetStatus` as a dict."""
    st = status or {}
    return Snapshot(
        version=int(record.get("policy_version", 0)),
        max_iterations=int(st.get("max_iterations") or max_iterations),
        score=float(record.get("score_mean", 0.0)), reward=float(record.get("reward_mean", 0.0)),
        kl=float(record.get("kl_to_ref", 0.0)),
        kl_coef=float(record.get("kl_coef", 0.0)), samples_trained=int(record.get("samples_trained", 0)),
        stale_dropped=int(record.get("stale_dropped", 0)), policy_lag=float(record.get("policy_lag_mean", 0.0)),
        time=float(record.get("time", 0.0)),
        buffer_depth=int(st.get("buffer_depth", record.get("buffer_depth", -1))),  # the log's when status is slow
        replicas=len(st["replicas"]) if "replicas" in st else -1,
        max_policy_lag=int(st.get("max_policy_lag", -2)))


def samples_per_s(history: list[Snapshot]) -> float:
    """Trained samples per second over the last `STALE_WARN_WINDOW` iterations (0 before two)."""
    if len(history) < 2:
        return 0.0
    a, b = history[max(0, len(history) - 1 - STALE_WARN_WINDOW)], history[-1]
    dt = b.time - a.time
    return (b.samples_trained - a.samples_trained) / dt if dt > 0 else 0.0


def stale_fraction(history: list[Snapshot], start: Snapshot | None = None) -> float:
    """Share of the records read over the last `STALE_WARN_WINDOW` iterations that were dropped stale.

    `start` is the state before the first iteration (samples already trained when resuming).
    """
    if not history:
        return 0.0
    base = [start] if start else [dataclasses.replace(history[0], samples_trained=0, stale_dropped=0)]
    seq = base + history
    a, b = seq[max(0, len(seq) - 1 - STALE_WARN_WINDOW)], seq[-1]
    dropped = b.stale_dropped - a.stale_dropped
    trained = b.samples_trained - a.samples_trained
    if dropped < 0:  # the learner restarted: its drop counter began again
        dropped, trained = b.stale_dropped, b.samples_trained - a.samples_trained
    total = dropped + trained
    return dropped / total if total > 0 else 0.0


def stale_warning(fraction: float, max_policy_lag: int) -> str:
    """The warning for a run dropping most of its experience, naming the setting to change."""
    head = (f"warning: {fraction:.0%} of the experience read over the last {STALE_WARN_WINDOW} iterations "
            f"was dropped as too stale (the rollout runs ahead of the learner).")
    if max_policy_lag == -1:
        fix = ("Pacing is off (learner.pacing.max_policy_lag: null): set learner.pacing.max_policy_lag "
               "(e.g. 1) so that generation waits for the learner, or lower worker.buffer.capacity.")
    else:
        lag = "" if max_policy_lag < 0 else f" (now {max_policy_lag})"
        fix = (f"Raise learner.pacing.max_policy_lag{lag}, or keep stale records with "
               "learner.pacing.stale_policy: keep.")
    return f"{head} {fix} See docs/pacing.md."


def _num(x: int) -> str:
    return "?" if x < 0 else str(x)


def fields(s: Snapshot, rate: float, stale: float) -> str:
    """The figures of one iteration, as printed after the bar (or the iteration number)."""
    return (f"score {s.score:+.4f}  reward {s.reward:+.4f}  kl {s.kl:.4f}  kl_coef {s.kl_coef:.4f}  "
            f"{rate:.1f} samples/s  buffer {_num(s.buffer_depth)}  lag {s.policy_lag:.2f}  "
            f"stale {s.stale_dropped} ({stale:.0%})")


def line(s: Snapshot, rate: float, stale: float) -> str:
    """The plain line of one iteration (stdout is not a terminal)."""
    total = f"/{s.max_iterations}" if s.max_iterations > 0 else ""
    return f"iteration {s.version}{total}: {fields(s, rate, stale)}"


def bar(s: Snapshot, rate: float, stale: float, width: int = 24) -> str:
    """The terminal's progress bar towards `max_iterations` (a count when there is no limit)."""
    if s.max_iterations > 0:
        done = min(width, width * s.version // s.max_iterations)
        head = f"[{'#' * done}{'.' * (width - done)}] {s.version}/{s.max_iterations}"
    else:
        head = f"[iteration {s.version}]"
    return f"{head}  {fields(s, rate, stale)}"


def summary(history: list[Snapshot], start: Snapshot | None, outcome: str, final_hf: str | None,
            last_checkpoint: str | None) -> str:
    """The closing lines: how the run ended, iterations, samples trained/dropped, final reward and KL,
    and where the final policy is."""
    out = [f"run {outcome}"]
    if history:
        last = history[-1]
        trained = last.samples_trained - (start.samples_trained if start else 0)
        dropped = last.stale_dropped - (start.stale_dropped if start else 0)  # one learner process
        out += [f"  iterations       {len(history)} (policy_version {last.version}"
                + (f" of {last.max_iterations})" if last.max_iterations > 0 else ")"),
                f"  samples          {trained} trained, {dropped} dropped as stale",
                f"  final            score {last.score:+.4f}  reward {last.reward:+.4f}  "
                f"kl to SFT {last.kl:.4f}  kl_coef {last.kl_coef:.4f}"]
    else:
        out.append("  no iteration was trained")
    if last_checkpoint:
        out.append(f"  checkpoint       {last_checkpoint}")
    out.append(f"  final policy (HF) {final_hf}" if final_hf else
               "  final policy (HF) none written (learner.checkpoint.save_hf is false, or no checkpoint)")
    return "\n".join(out)


class Console:
    """Feeds snapshots in, prints bar/lines and the warning; `tty=None` asks the stream."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.history: list[Snapshot] = []
        self.start: Snapshot | None = None
        self.warned = False
        self._open_bar = False

    def update(self, s: Snapshot) -> None:
        self.history.append(s)
        rate, stale = samples_per_s(self.history), stale_fraction(self.history, self.start)
        if self.tty:
            self.stream.write(f"\r{bar(s, rate, stale)}\x1b[K")
            self._open_bar = True
        else:
            self.stream.write(line(s, rate, stale) + "\n")
        if stale > STALE_WARN_FRACTION and not self.warned:
            self.say(stale_warning(stale, s.max_policy_lag))
            self.warned = True
        elif stale <= STALE_WARN_FRACTION / 2:
            self.warned = False  # it recovered: warn again if it comes back
        self.stream.flush()

    def say(self, text: str) -> None:
        """A message on its own lines (ends an open bar first)."""
        if self._open_bar:
            self.stream.write("\n")
            self._open_bar = False
        self.stream.write(text + "\n")
        self.stream.flush()
