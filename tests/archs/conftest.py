"""The arch matrix reuses the learner tests' helpers (tests/learner/learner_testkit.py)."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "learner"))
