"""The `instructrl` command: one entry point dispatching to each role's `main(argv)`.

Subcommands import their module lazily, so `instructrl --help` stays fast and a
role's heavy dependencies (vLLM, DeepSpeed) load only where they run.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("instructrl.serve", "run one service: serve {rollout,reward,reference,learner} --config FILE"),
    "rollout-worker": ("instructrl.rollout.worker", "claim prompts, generate, score, write experience"),
    "tiny-model": ("instructrl.models.cli", "build a tiny Llama + BPE tokenizer as a HF directory"),
    "fetch-models": ("instructrl.models.fetch", "download HF model repos at pinned commits into a models volume"),
    "sft": ("instructrl.offline.sft", "supervised fine-tuning on JSONL {prompt, response}"),
    "rm": ("instructrl.offline.rm", "reward-model training on K-wise rankings"),
    "dpo": ("instructrl.offline.dpo", "DPO on preference pairs against the frozen SFT reference"),
    "launch": ("instructrl.launcher", "start Redis, reward, reference, rollout(s) and learner locally"),
    "status": ("instructrl.learner.status", "a running learner's status: status ADDRESS [--json]"),
    "sample": ("instructrl.models.sample", "JSONL completions of a checkpoint: sample --model DIR --prompts FILE"),
    "demo": ("instructrl.demo.main", "the whole InstructGPT recipe on a synthetic task, end to end"),
}


def _usage() -> str:
    lines = ["usage: instructrl COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<15} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `instructrl COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from instructrl import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"instructrl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
