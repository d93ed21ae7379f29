"""`instructrl tiny-model`: build a tiny causal LM (Llama by default) and its tokenizer as a HF directory."""
from __future__ import annotations

import argparse
import pathlib

from instructrl.config import ConfigError, apply_overrides, from_dict, help_lines
from instructrl.models.tiny import ARCHITECTURES, TinyModelConfig, build_tiny


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="instructrl tiny-model", description=__doc__,
        epilog="config fields (set as key=value):\n  " + "\n  ".join(help_lines(TinyModelConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--arch", default="llama", choices=ARCHITECTURES,
                    help="architecture (models/tiny.py has each one's traits; default llama)")
    ap.add_argument("--text", action="append", default=[],
                    help="text file(s) to train the tokenizer on, one example per line (default: built-in corpus)")
    ap.add_argument("overrides", nargs="*", help="config fields, e.g. hidden_size=256 num_layers=4")
    args = ap.parse_args(argv)
    try:
        cfg = from_dict(TinyModelConfig, apply_overrides({}, args.overrides))
        cfg.validate()
    except (ConfigError, ValueError) as e:
        ap.error(str(e))
    texts = None
    if args.text:
        texts = []
        for f in args.text:
            p = pathlib.Path(f)
            if not p.exists():
                ap.error(f"--text {f}: no such file")
            texts += [line for line in p.read_text().splitlines() if line.strip()]
    model, tok = build_tiny(args.arch, args.out, cfg, texts)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__} {n / 1e6:.2f}M params, vocab {len(tok)}")
    return 0
