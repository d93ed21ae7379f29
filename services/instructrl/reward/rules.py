"""Rule-based rewards for verifiable tasks: `rule: "instructrl.reward.rules:exact_match"`.

A rule is `fn(prompt: str, response: str, metadata: dict[str, str]) -> float`;
`metadata` is ScoreItem.metadata (e.g. the gold answer). Raise `ValueError` for
an input the rule cannot judge: the caller gets INVALID_ARGUMENT for that request.
"""
from __future__ import annotations


def exact_match(prompt: str, response: str, metadata: dict[str, str]) -> float:
    """1.0 when the response, stripped of surrounding whitespace, equals metadata["answer"], else 0.0."""
    if "answer" not in metadata:
        raise ValueError('metadata["answer"] is missing; exact_match needs the gold answer')
    return 1.0 if response.strip() == metadata["answer"].strip() else 0.0
