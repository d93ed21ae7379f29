"""`instructrl serve ROLE`: run one gRPC service; each role's server module owns its flags."""
from __future__ import annotations

import importlib
import sys

ROLES = ("rollout", "reward", "reference", "learner")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ROLES:
        print(f"usage: instructrl serve {{{','.join(ROLES)}}} [--config FILE] [key=value ...]",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(f"instructrl.{argv[0]}.server").main(argv[1:]) or 0)
