"""The launcher's console: progress line/bar, the stale-drop warning and the summary, from snapshots."""
from __future__ import annotations

import io

from instructrl.launcher import progress as P


def _rec(v: int, *, trained: int, stale: int = 0, t: float = 0.0) -> dict:
    return {"policy_version": v, "score_mean": 0.75, "reward_mean": 0.25, "kl_to_ref": 0.125, "kl_coef": 0.05,
            "samples_trained": trained, "stale_dropped": stale, "policy_lag_mean": 0.5, "time": t}


STATUS = {"max_iterations": 4, "buffer_depth": 7, "max_policy_lag": 1, "replicas": [{"replica_id": "r0"}],
          "samples_trained": 0, "stale_dropped": 0}


def test_plain_line_has_every_figure():
    s = P.snapshot(_rec(2, trained=64, stale=16, t=10.0), STATUS)
    text = P.line(s, rate=12.5, stale=0.2)
    assert text == ("iteration 2/4: score +0.7500  reward +0.2500  kl 0.1250  kl_coef 0.0500  12.5 samples/s  "
                    "buffer 7  lag 0.50  stale 16 (20%)")


def test_bar_fills_towards_max_iterations():
    s = P.snapshot(_rec(2, trained=64), STATUS)
    assert P.bar(s, 0.0, 0.0, width=8).startswith("[####....] 2/4  score +0.7500")
    s = P.snapshot(_rec(9, trained=64), None, max_iterations=0)  # no limit, no status
    assert P.bar(s, 0.0, 0.0).startswith("[iteration 9]") and "buffer ?" in P.bar(s, 0.0, 0.0)
    s = P.snapshot({**_rec(9, trained=64), "buffer_depth": 12}, None)  # no status: the log's depth
    assert "buffer 12 " in P.bar(s, 0.0, 0.0)


def test_rate_and_stale_fraction_over_the_last_iterations():
    hist = [P.snapshot(_rec(v, trained=32 * v, stale=s, t=2.0 * v)) for v, s in
            [(1, 0), (2, 0), (3, 32), (4, 96), (5, 160)]]
    assert P.samples_per_s(hist[:1]) == 0.0
    assert P.samples_per_s(hist) == 16.0  # 96 samples over the last 3 iterations' 6 s
    # last 3 iterations: 96 trained, 160 dropped
    assert P.stale_fraction(hist) == 160 / 256
    assert P.stale_fraction(hist[:2]) == 0.0
    start = P.snapshot({"samples_trained": 0, "stale_dropped": 0})
    assert P.stale_fraction(hist[:1], start) == 0.0


def test_console_plain_lines_and_one_warning_naming_the_setting():
    out = io.StringIO()
    c = P.Console(out, tty=False)
    c.start = P.snapshot({"samples_trained": 0, "stale_dropped": 0}, STATUS)
    c.update(P.snapshot(_rec(1, trained=32, stale=0, t=1.0), STATUS))
    c.update(P.snapshot(_rec(2, trained=64, stale=96, t=2.0), STATUS))  # 96 of 160 read were dropped
    c.update(P.snapshot(_rec(3, trained=96, stale=192, t=3.0), STATUS))
    lines = out.getvalue().splitlines()
    assert [x.split(":")[0] for x in lines if x.startswith("iteration")] == ["iteration 1/4", "iteration 2/4",
                                                                           "iteration 3/4"]
    warnings = [x for x in lines if x.startswith("warning")]
    assert len(warnings) == 1 and "60%" in warnings[0]
    assert "learner.pacing.max_policy_lag (now 1)" in warnings[0] and "docs/pacing.md" in warnings[0]


def test_warning_when_pacing_is_off_names_it():
    text = P.stale_warning(0.8, -1)
    assert "Pacing is off" in text and "learner.pacing.max_policy_lag" in text and "worker.buffer.capacity" in text


def test_console_on_a_terminal_redraws_one_bar():
    out = io.StringIO()
    c = P.Console(out, tty=True)
    for v in (1, 2):
        c.update(P.snapshot(_rec(v, trained=32 * v, t=float(v)), STATUS))
    c.say("done")
    text = out.getvalue()
    assert text.count("\r[") == 2 and "\n" not in text[:-len("\ndone\n")] and text.endswith("\ndone\n")


def test_summary_counts_this_run_and_names_the_final_policy():
    start = P.snapshot({"samples_trained": 64, "stale_dropped": 0}, STATUS)  # resumed at v2
    hist = [P.snapshot(_rec(v, trained=32 * v, stale=8, t=float(v)), STATUS) for v in (3, 4)]
    text = P.summary(hist, start, "finished", "/w/checkpoints/iteration-00000004/actor_hf",
                     "/w/checkpoints/iteration-00000004")
    assert "iterations       2 (policy_version 4 of 4)" in text
    assert "64 trained, 8 dropped as stale" in text
    assert "score +0.7500  reward +0.2500  kl to SFT 0.1250" in text
    assert "final policy (HF) /w/checkpoints/iteration-00000004/actor_hf" in text
    assert "no iteration was trained" in P.summary([], None, "interrupted", None, None)
