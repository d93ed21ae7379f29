"""The learner: PPO on actor + critic under DeepSpeed, fed by the experience buffer.

`loop.train(cfg)` is the whole algorithm, top to bottom; `server.main` runs it with the
LearnerService gRPC API. See docs/learner.md.
"""
from instructrl.learner.config import LearnerConfig

__all__ = ["LearnerConfig"]
