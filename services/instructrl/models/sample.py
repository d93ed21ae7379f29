"""`instructrl sample`: JSONL completions of any checkpoint with vLLM, to score a policy yourself.

    instructrl sample --model runs/local/checkpoints/iteration-00000020/actor_hf \\
        --prompts eval_prompts.jsonl --n 4 --temperature 1.0 --out completions.jsonl

`--model` is any Hugging Face directory vLLM loads: an SFT model, a learner checkpoint's
`actor_hf/`, a model from `instructrl tiny-model`. `--prompts` is the prompt format of
`instructrl launch` (docs/launch.md): one JSON object a line, `{"prompt": ..., "prompt_id"?: ...,
"metadata"?: {...}}`. Each completion is one output line:

    {"prompt_id": "p1", "index": 0, "prompt": "...", "completion": "...", "finish_reason": "stop",
     "token_ids": [412, 9, ...], "metadata": {...}}

Prompts are formatted and tokenized as the rollout service does (`models/prompt_format.py`): in
the prompt format stored in the model's `instructrl.json` (SFT writes it, learner checkpoints keep
it) unless `--prompt-format` names one. On CPU the engine runs in float32 with
`VLLM_CPU_KVCACHE_SPACE` (GiB, default here 1).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import IO, Any

from instructrl.config import ConfigError
from instructrl.models import prompt_format


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="instructrl sample", description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (e.g. a checkpoint's actor_hf/)")
    ap.add_argument("--prompts", required=True, help="JSONL of prompts: {prompt, prompt_id?, metadata?}")
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    ap.add_argument("--max-tokens", type=int, default=64, help="most new tokens per completion")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--max-model-len", type=int, default=0, help="context length (0 = the model's)")
    ap.add_argument("--dtype", default="", help="weights' dtype (default: float32 on CPU, auto elsewhere)")
    ap.add_argument("--prompt-format", default="",
                    help="raw | chat | a format string with {prompt} (default: the one stored with --model)")
    ap.add_argument("--out", default="-", help="output JSONL file ('-' = stdout)")
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    model = pathlib.Path(args.model)
    if not (model / "config.json").is_file():
        ap.error(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    if args.n < 1:
        ap.error("--n: must be >= 1")
    if args.temperature < 0:
        ap.error("--temperature: must be >= 0")
    if args.temperature == 0 and args.n > 1:
        ap.error("--n: greedy decoding (--temperature 0) gives one completion per prompt; use --n 1")
    if not 0 < args.top_p <= 1:
        ap.error("--top-p: must be in (0, 1]")
    if args.max_tokens < 1:
        ap.error("--max-tokens: must be >= 1")


def rows(prompts: list[dict], outputs: list[Any]) -> list[dict]:
    """One output row per completion (`outputs`: vLLM `RequestOutput`s, in prompt order)."""
    out = []
    for p, o in zip(prompts, outputs, strict=True):
        for c in o.outputs:
            out.append({"prompt_id": p["prompt_id"], "index": c.index, "prompt": p["prompt"], "completion": c.text,
                        "finish_reason": c.finish_reason, "token_ids": list(c.token_ids), "metadata": p["metadata"]})
    return out


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (vLLM's logs, its engine process's) to stderr meanwhile, so
    that stdout carries the JSONL alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def prompt_ids(model_dir: str, prompts: list[dict], fmt: str) -> list[list[int]]:
    """Each prompt's token ids under prompt format `fmt`, with the model's tokenizer (as the rollout engine)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [prompt_format.encode_prompt(tokenizer, p["prompt"], fmt) for p in prompts]


def generate(args: argparse.Namespace, prompts: list[dict], fmt: str) -> list[dict]:
    """Run vLLM's offline `LLM` over the prompts formatted with `fmt` (its output on stderr)."""
    ids = prompt_ids(args.model, prompts, fmt)
    with _stdout_to_stderr():
        return _generate(args, prompts, ids)


def _generate(args: argparse.Namespace, prompts: list[dict], ids: list[list[int]]) -> list[dict]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cpu = not torch.cuda.is_available()
    kw: dict[str, Any] = {"dtype": args.dtype or ("float32" if cpu else "auto"), "seed": args.seed,
                          "enforce_eager": cpu}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    llm = LLM(model=str(args.model), **kw)
    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    finally:
        del llm  # the engine's processes end here, not at interpreter exit
    return rows(prompts, outputs)


def main(argv: list[str]) -> int:
    from instructrl.launcher.run import read_prompts

    ap = _parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    try:
        prompts = read_prompts(args.prompts)
    except ConfigError as e:
        ap.error(f"--prompts: {e}")
    try:
        fmt = prompt_format.resolve(args.prompt_format, args.model, "--prompt-format")
    except ConfigError as e:
        ap.error(str(e))
    result = generate(args, prompts, fmt)
    sink: IO[str] = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115
    try:
        for row in result:
            sink.write(json.dumps(row) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    if args.out != "-":
        print(f"wrote {len(result)} completions of {len(prompts)} prompts to {args.out}", file=sys.stderr)
    return 0
