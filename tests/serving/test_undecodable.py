"""Request bytes that are not a valid message get INVALID_ARGUMENT, on every real service.

grpc answers UNKNOWN ("Unexpected <class DecodeError>") when a deserializer raises; the
shared interceptor (serving/interceptors.py) turns that into INVALID_ARGUMENT. Raw bytes go
out through a generic `unary_unary` call with no serializer. The rollout service shares the
same `GrpcServer` and is covered by the fuzz test (tests/serving/test_fuzz.py).
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructrl.learner.control import Control
from instructrl.learner.server import ServerThread
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.server import reference_server
from instructrl.reward.config import RewardConfig
from instructrl.reward.server import reward_server
from instructrl.serving.server import ServerConfig

# an unterminated varint; a length-delimited field longer than the message; a bad wire type
GARBAGE = (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0f")
METHODS = {
    "reward": ["/instructrl.v1.RewardService/Score"],
    "reference": ["/instructrl.v1.ReferenceService/LogProbs"],
    "learner": ["/instructrl.v1.LearnerService/" + m
                for m in ("GetStatus", "RegisterRollout", "UnregisterRollout", "SaveCheckpoint")],
}


async def _codes(port: int, methods: list[str]) -> list[grpc.StatusCode]:
    codes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for method in methods:
            call = ch.unary_unary(method)  # no serializers: bytes on the wire as given
            for raw in GARBAGE:
                try:
                    await call(raw, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    return codes


def _server_cfg() -> ServerConfig:
    return ServerConfig(port=0, metrics_port=-1)


def test_reward_and_reference(reward_model_dir, sft_model_dir):
    async def main():
        for name, srv in (("reward", reward_server(RewardConfig(model=str(reward_model_dir), server=_server_cfg()))),
                          ("reference", reference_server(ReferenceConfig(model=str(sft_model_dir),
                                                                         server=_server_cfg())))):
            await srv.start()
            try:
                codes = await _codes(srv.port, METHODS[name])
            finally:
                await srv.stop(0)
            assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(codes), (name, codes)
    asyncio.run(main())


def test_learner():
    control = Control()
    control.ready.set()
    server = ServerThread(_server_cfg(), control).start()
    try:
        codes = asyncio.run(_codes(server.port, METHODS["learner"]))
    finally:
        server.stop(0)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(codes), codes


def test_a_huge_error_message_keeps_its_code():
    """An error quoting a huge request field (here 1 MB) used to overflow the client's trailer
    limit and arrive as RESOURCE_EXHAUSTED; the details are cut, the code stays."""
    from instructrl.serving.server import GrpcServer
    from instructrl.v1 import reference_pb2, reference_pb2_grpc

    class Quoting(reference_pb2_grpc.ReferenceServiceServicer):
        async def LogProbs(self, request, context):
            raise ValueError("bad: " + "x" * (1 << 20))

    async def main():
        srv = await GrpcServer("reference", _server_cfg(), [(reference_pb2_grpc.add_ReferenceServiceServicer_to_server,
                                                             Quoting(), "instructrl.v1.ReferenceService")]).start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                try:
                    stub = reference_pb2_grpc.ReferenceServiceStub(ch)
                    await stub.LogProbs(reference_pb2.LogProbsRequest(), timeout=10)
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
        finally:
            await srv.stop(0)
    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("bad: xxx") and len(details) < 2100
