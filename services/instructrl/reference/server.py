"""The reference service: `ReferenceService.LogProbs` over `scorer.py`, batched across requests.

`instructrl serve reference --config reference.yaml server.port=50053` runs it (see docs/services.md).
"""
from __future__ import annotations

from instructrl.codec import logprobs, token_array
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.scorer import LogProbsInput, ReferenceScorer
from instructrl.serving import scoring
from instructrl.serving.batcher import DynamicBatcher
from instructrl.v1 import reference_pb2, reference_pb2_grpc

SERVICE_NAME = "instructrl.v1.ReferenceService"


def _input(item: reference_pb2.LogProbsItem, k: int, temperature: float) -> LogProbsInput:
    return LogProbsInput(token_array(item.token_ids, f"items[{k}].token_ids").tolist(), item.response_start,
                         temperature or 1.0)  # proto3: 0 = unset = 1


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, scorer: ReferenceScorer, batcher: DynamicBatcher):
        self.scorer, self.batcher = scorer, batcher

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context) -> reference_pb2.LogProbsResponse:
        inputs = [_input(it, k, request.temperature) for k, it in enumerate(request.items)]
        results = await scoring.score(self.scorer, self.batcher, inputs, context)
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.LogProbsResult(logprobs=logprobs(lp)) for lp in results], model=self.scorer.name)


def reference_server(cfg: ReferenceConfig, scorer: ReferenceScorer | None = None) -> scoring.ScoringServer:
    """The reference service, not started (loads the model unless `scorer` is given)."""
    scorer = scorer if scorer is not None else ReferenceScorer(cfg)
    return scoring.ScoringServer("reference", scorer, cfg.server, cfg.batching, cfg.torch_threads,
                                 lambda batcher: ReferenceServicer(scorer, batcher),
                                 reference_pb2_grpc.add_ReferenceServiceServicer_to_server, SERVICE_NAME)


def main(argv: list[str]) -> int:
    return scoring.main("instructrl serve reference", ReferenceConfig, argv, __doc__.splitlines()[0],
                        "server.port=50053", reference_server)
