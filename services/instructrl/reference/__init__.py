"""Reference service: log-probs of response tokens under the frozen SFT model.

`scorer.py` is the transport-free core, `server.py` the thin gRPC shell over it,
`client.py` what rollout workers call. See docs/services.md.
"""
