"""The demo: a built-in synthetic instruction-following task (``task``) and the
end-to-end run of SFT -> RM -> PPO on it.

``instructrl.demo.task`` is pure Python (no torch): prompts, the programmatic
gold score, demonstrations, noisy K-wise rankings and JSONL writers.
"""
