"""The local launcher: every role of an online run as a supervised process."""
from __future__ import annotations


def main(argv: list[str]) -> int:
    from instructrl.launcher.run import main as run_main
    return run_main(argv)
