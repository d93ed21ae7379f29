"""The learner: PPO on actor + critic under DeepSpeed, fed by the experience buffer.

`loop.train(cfg)` is the algorithm, read top to bottom as named steps (the PPO math of
steps 2-4 in `update.py`); `server.main` runs it with the LearnerService gRPC API. See
docs/learner.md.
"""
from instructrl.learner.config import LearnerConfig

__all__ = ["LearnerConfig"]
