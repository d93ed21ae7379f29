"""Rollout replica: a vLLM engine of the current policy behind the RolloutService, live weight
updates from the learner, and the rollout worker that turns prompts into experience records.

- `engine.RolloutEngine`: transport-free core over vLLM's AsyncLLM.
- `extension.WeightSyncExtension`: the vLLM worker extension that receives and reloads weights.
- `server.main`: `instructrl serve rollout`; `client.RolloutClient`: async Generate client.
- `worker.main`: `instructrl rollout-worker`.
"""
