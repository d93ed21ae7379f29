"""The demo's report: PNG plots and report.md from the learner's JSONL log and the evaluations."""
from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    p = pathlib.Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _save(fig, out: pathlib.Path) -> pathlib.Path:
    """Write `fig` as a PNG to `out` and free it; returns `out`."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _legend_of_both(ax, ax2) -> None:
    """One legend on `ax` for the lines of `ax` and of its twin `ax2`."""
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)


def _bars_with_values(ax, bars: dict[str, float], color) -> None:
    """A bar a name, its value written above it, on a 0..1 axis."""
    names = list(bars)
    ax.bar(names, [bars[n] for n in names], color=color)
    for i, n in enumerate(names):
        ax.text(i, bars[n] + 0.01, f"{bars[n]:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0, 1.05)


def plot_reward_kl(log: list[dict], out: pathlib.Path) -> pathlib.Path:
    """RLHF reward, RM score and KL to SFT per PPO iteration."""
    steps = [r["policy_version"] for r in log]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["score_mean"] for r in log], label="RM score", color="tab:blue")
    ax.plot(steps, [r["reward_mean"] for r in log], label="RLHF reward (score - beta KL)", color="tab:green")
    ax.set_xlabel("PPO iteration (policy_version)")
    ax.set_ylabel("reward")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["kl_to_ref"] for r in log], label="KL(policy || SFT)", color="tab:red", linestyle="--")
    ax2.set_ylabel("KL (nats / sequence)")
    _legend_of_both(ax, ax2)
    ax.set_title("PPO: reward and KL per iteration")
    return _save(fig, out)


def plot_gold(bars: dict[str, float], out: pathlib.Path, title: str) -> pathlib.Path:
    """Held-out gold score of each model."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    _bars_with_values(ax, bars, ["tab:gray", "tab:green", "tab:purple", "tab:orange"][:len(bars)])
    ax.set_ylabel("held-out gold score")
    ax.set_title(title)
    return _save(fig, out)


def plot_rm_accuracy(rm_metrics: dict[str, float], out: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _bars_with_values(ax, rm_metrics, "tab:blue")
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title("Reward model accuracy")
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_overoptimization(points: Sequence[dict[str, float]], out: pathlib.Path) -> pathlib.Path:
    """Proxy (RM) score and gold score of PPO checkpoints against sqrt(KL to SFT), as Gao et al. 2022 plot."""
    pts = sorted(points, key=lambda p: p["kl"])
    x = [math.sqrt(max(p["kl"], 0.0)) for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(x, [p["proxy"] for p in pts], "o-", label="proxy: RM score", color="tab:blue")
    ax.set_xlabel("sqrt(KL(policy || SFT))  (nats^0.5, per sequence)")
    ax.set_ylabel("RM score")
    ax2 = ax.twinx()
    ax2.plot(x, [p["gold"] for p in pts], "s--", label="gold score", color="tab:orange")
    ax2.set_ylabel("gold score")
    for p, xi in zip(pts, x, strict=True):
        ax.annotate(f"v{int(p['version'])}", (xi, p["proxy"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    _legend_of_both(ax, ax2)
    ax.set_title("Proxy vs gold reward along the PPO run")
    return _save(fig, out)


def write_report(out_dir: pathlib.Path, summary: dict[str, Any], log: list[dict],
                 curve: list[dict[str, float]], examples: list[tuple[str, str, str, float, float]]) -> pathlib.Path:
    """Write report.md (and its PNGs) into `out_dir`; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = {}
    if log:
        figs["reward_kl"] = plot_reward_kl(log, out_dir / "reward_kl.png")
    figs["gold"] = plot_gold(summary["gold"], out_dir / "gold_scores.png", "Held-out gold score (sampled, T=1)")
    figs["rm"] = plot_rm_accuracy(summary["rm_accuracy"], out_dir / "rm_accuracy.png")
    if len(curve) >= 2:
        figs["curve"] = plot_overoptimization(curve, out_dir / "overoptimization.png")
    s = summary
    lines = [
        "# instructrl demo report", "",
        f"Task: synthetic instruction following ({', '.join(s['tasks'])}); gold score in [0, 1] "
        "from the programmatic labeler (correctness x brevity). All numbers are on held-out prompts "
        f"({s['eval_prompts']} prompts never seen in training). \"sampled\" = one response per prompt "
        "at temperature 1, as the policy acts during PPO; \"greedy\" = argmax decoding.", "",
        "| model | params | gold (sampled) | gold (greedy) | RM score (sampled) |", "|---|---|---|---|---|",
    ]
    for name, g in s["gold"].items():
        greedy = s['gold_greedy'].get(name, float('nan'))
        lines.append(f"| {name} | {s['params'].get(name, '')} | {g:.3f} | {greedy:.3f} "
                     f"| {s['proxy'].get(name, float('nan')):.3f} |")
    lines += ["",
              f"- PPO vs SFT: gold {s['gold']['PPO']:.3f} vs {s['gold']['SFT']:.3f} "
              f"({s['gold']['PPO'] - s['gold']['SFT']:+.3f} ± {2 * s['gold_diff_se']:.3f}, 2 paired standard errors); "
              "labeler prefers PPO to SFT on "
              f"{s['win_rate_ppo_vs_sft']:.1%} of prompts (ties half); greedy: gold "
              f"{s['gold_greedy']['PPO']:.3f} vs {s['gold_greedy']['SFT']:.3f} "
              f"({s['gold_greedy']['PPO'] - s['gold_greedy']['SFT']:+.3f} ± {2 * s['gold_diff_se_greedy']:.3f}), "
              "PPO preferred on "
              f"{s['win_rate_ppo_vs_sft_greedy']:.1%}.",
              f"- KL(PPO policy || SFT) at the end: {s['final_kl']:.3f} nats per sequence "
              f"(beta = {s['final_kl_coef']:.4f}).",
              ]
    if "win_rate_ppo_vs_big" in s:
        lines.append(f"- PPO ({s['params']['PPO']}) vs SFT-only model 4x its size ({s['params'].get('SFT 4x', '')}): "
                     f"labeler prefers PPO on {s['win_rate_ppo_vs_big']:.1%} of prompts sampled, "
                     f"{s['win_rate_ppo_vs_big_greedy']:.1%} greedy — InstructGPT's headline "
                     "(1.3B InstructGPT preferred to 175B GPT-3) in miniature.")
    lines += [f"- Reward model: held-out pairwise accuracy {s['rm_accuracy'].get('held-out', float('nan')):.3f} "
              f"(labelers agree with each other on {s['labeler_agreement']:.1%} of pairs).", "",
              f"Timings (s): {json.dumps(s['timings'])}", ""]
    if "reward_kl" in figs:
        lines += ["## Reward and KL per PPO iteration", "", "![reward and KL](reward_kl.png)", ""]
    lines += ["## Gold score: SFT vs PPO", "", "![gold](gold_scores.png)", "", "By task (sampled):", "",
              "| task | " + " | ".join(s["gold_by_task"]) + " |",
              "|---|" + "---|" * len(s["gold_by_task"])]
    tasks = sorted(next(iter(s["gold_by_task"].values())).keys())
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{s['gold_by_task'][m][t]:.3f}" for m in s["gold_by_task"]) + " |")
    lines += ["", "## Reward model", "", "![rm accuracy](rm_accuracy.png)", ""]
    if "curve" in figs:
        lines += ["## Proxy reward vs gold score (overoptimization, Gao et al. 2022)", "",
                  "![overoptimization](overoptimization.png)", "",
                  "| version | KL | RM score | gold |", "|---|---|---|---|"]
        lines += [f"| {int(p['version'])} | {p['kl']:.3f} | {p['proxy']:.3f} | {p['gold']:.3f} |" for p in curve]
        lines.append("")
    lines += ["## Examples (held-out)", "", "| prompt | SFT | PPO | gold SFT | gold PPO |", "|---|---|---|---|---|"]
    for p, a, b, ga, gb in examples:
        lines.append(f"| `{p}` | `{a.strip()}` | `{b.strip()}` | {ga:.2f} | {gb:.2f} |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return path
