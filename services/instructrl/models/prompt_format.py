"""How a prompt's text becomes token ids, once for the whole system.

A prompt format is one of

- `raw`: the prompt text as it is (the default; what the demo uses);
- `chat`: the tokenizer's own `chat_template`, the prompt as one user message, with the
  generation prompt appended (what instruction-tuned checkpoints such as Llama-3-Instruct
  or Qwen2.5-Instruct expect);
- a format string containing `{prompt}`, e.g. `"Human: {prompt}\\n\\nAssistant:"`.

The formatted text is tokenised with `add_special_tokens=False` (a chat template writes
its own BOS), the response apart from it, and the sequence is prompt ids + response ids
(`offline/data.py`). The format is chosen once, at SFT (`data.prompt_format`), stored in
the model directory's `instructrl.json` (`prompt_format`) and read from there by every
later user of that model: the RM stage, the rollout engine (the prompt stream's text
prompts), the reward service (text prompts). The reference service and the learner
receive token ids, so they see exactly what the rollout produced.
"""
from __future__ import annotations

import json
import pathlib

from instructrl.config import ConfigError

RAW, CHAT = "raw", "chat"
METADATA = "instructrl.json"


def validate(fmt: str, where: str = "prompt_format") -> str:
    """`fmt` if it is `raw`, `chat` or a string with exactly one `{prompt}`; ConfigError naming `where`."""
    if fmt in (RAW, CHAT):
        return fmt
    if fmt.count("{prompt}") != 1:
        raise ConfigError(f"{where}: {fmt!r} is not raw, chat or a format string with one {{prompt}}")
    return fmt


def of_model(model_dir: str | pathlib.Path) -> str:
    """The prompt format stored in `<model_dir>/instructrl.json` (`raw` when none is stored)."""
    path = pathlib.Path(model_dir) / METADATA
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return RAW
    return validate(str(info.get("prompt_format") or RAW), f"{path}: prompt_format")


def resolve(configured: str, model_dir: str | pathlib.Path, where: str = "prompt_format") -> str:
    """The configured format, or (empty) the one stored with the model."""
    return validate(configured, where) if configured else of_model(model_dir)


def render(tokenizer, prompt: str, fmt: str) -> str:
    """The prompt's text as the model sees it under `fmt`."""
    if fmt == RAW:
        return prompt
    if fmt == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format: chat, but the tokenizer has no chat_template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return fmt.replace("{prompt}", prompt)


def encode_prompt(tokenizer, prompt: str, fmt: str) -> list[int]:
    """Token ids of the formatted prompt (no special tokens added beyond what the format writes)."""
    return list(tokenizer(render(tokenizer, prompt, fmt), add_special_tokens=False)["input_ids"])
