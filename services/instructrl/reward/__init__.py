"""Reward service: scores (prompt, response) pairs with a reward model or a rule.

`scorer.py` is the transport-free core, `server.py` the thin gRPC shell over it,
`client.py` what rollout workers call. See docs/services.md.
"""
