"""A scale-down: the worker unregisters from the learner on SIGTERM even when it holds nothing.

Found by the cluster bed's scenario 2 (scale 3 -> 1): an idle worker's loop ends at once when
told to stop, and the drain task that was about to call `UnregisterRollout` was cancelled with
it, so removed pods stayed in the learner's group until evicted after failed syncs. Here the
learner is a recording gRPC servicer over a real socket (the scenario is the real test) and
the worker is real, on real Redis, its rollout service not up (the loop retries, then stops)."""
from __future__ import annotations

import asyncio

import grpc
from redis_server import free_port

from instructrl.buffer import BufferConfig, RedisConfig
from instructrl.rollout.worker import RetryConfig, RolloutWorker, WorkerConfig
from instructrl.serving.client import ClientConfig
from instructrl.v1 import learner_pb2, learner_pb2_grpc


class _Learner(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self) -> None:
        self.unregistered: list[str] = []

    async def RegisterRollout(self, request, context):
        return learner_pb2.RegisterRolloutResponse()

    async def UnregisterRollout(self, request, context):
        self.unregistered.append(request.replica_id)
        return learner_pb2.UnregisterRolloutResponse()


def test_an_idle_worker_told_to_stop_unregisters(redis_url, run_id):
    async def main() -> list[str]:
        learner, server = _Learner(), grpc.aio.server()
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(learner, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        dead = f"127.0.0.1:{free_port()}"
        cfg = WorkerConfig(replica_id="leaving", rollout=ClientConfig(address=dead, timeout_s=1),
                           reward=ClientConfig(address=dead), reference=ClientConfig(address=dead),
                           learner=ClientConfig(address=f"127.0.0.1:{port}", timeout_s=5),
                           buffer=BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=100),
                           retry=RetryConfig(base_s=0.05, cap_s=0.2), metrics_port=-1, drain_timeout_s=5)
        worker = RolloutWorker(cfg)
        try:
            run = asyncio.ensure_future(worker.run())
            await asyncio.sleep(1.0)
            worker.stop.set()  # what SIGTERM does
            assert await asyncio.wait_for(run, 20) == 0
        finally:
            await server.stop(0)
        return learner.unregistered
    assert asyncio.run(main()) == ["leaving"]
