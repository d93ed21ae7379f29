"""A rule reward that crashes on one prompt (a poison prompt), for the worker's failure test.

`rule=poison_rule:poison`: 0.0 for every prompt but one whose text contains "poison", on which it
raises RuntimeError (the reward service answers INTERNAL), as a reward model that crashes on
one input would.
"""
from __future__ import annotations


def poison(prompt: str, response: str, metadata: dict[str, str]) -> float:
    if "poison" in prompt.replace(" ", ""):
        raise RuntimeError("the reward model crashed on this prompt")
    return 0.0
