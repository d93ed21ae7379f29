"""Experience buffer vs raw Redis streams, same records, same run.

Records of realistic size: a 128-token prompt and a 512-token response (INT32) with the
sampling and reference log-probs (FP32), about 6.7 KB serialized. Each round moves N
records through
  raw:    pipelined XADD of the serialized bytes, then XREADGROUP + XACK, and
  buffer: ExperienceBuffer.put (serialize, validate, capacity check, XADD in Lua), then
          get (XREADGROUP, parse, validate, dedup lookup) + ack (commit, XACK, XDEL),
in rounds that alternate which side goes first. records/s is N / (put time + get time);
the ratio is the median of the per-round ratios (neighbouring runs see the same machine
load), the rates are the medians of the rounds.

Then the learner's decode of the per-token data, in us per record (best of the rounds):
`tensor_bytes` parses the record and views its four tensors with np.frombuffer (the one
encoding, `instructrl.codec`), `packed_repeated` parses the same data as packed repeated
int32/float fields and converts them with np.array (the alternative), and `from_records`
is the learner's whole batch construction (learner/batch.py: decode + padding). The last
line printed is JSON.

  python bench/buffer.py [--records N] [--batch B] [--rounds R] [--url redis://...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig, delete_run, redis_from_url
from instructrl.codec import logprob_array, token_array
from instructrl.v1 import common_pb2, experience_pb2

P, T = 128, 512  # prompt and response tokens


def tensor(arr: np.ndarray, datatype: str) -> common_pb2.Tensor:
    return common_pb2.Tensor(datatype=datatype, shape=list(arr.shape), raw_data=arr.tobytes())


def make_records(n: int, tag: str) -> list[experience_pb2.Experience]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(experience_pb2.Experience(
            sample_id=f"{tag}-{i}", prompt_id=f"p{i}", finish_reason="length", policy_version=0,
            prompt_token_ids=tensor(rng.integers(0, 32000, P, dtype="<i4"), "INT32"),
            response_token_ids=tensor(rng.integers(0, 32000, T, dtype="<i4"), "INT32"),
            sampling_logprobs=tensor(-rng.random(T, dtype="<f4") * 4, "FP32"),
            ref_logprobs=tensor(-rng.random(T, dtype="<f4") * 4, "FP32"),
            score=0.3, raw_score=1.2, run_id=tag, replica_id="bench", sample_index=0))
    return out


def raw_round(client, key: str, blobs: list[bytes], batch: int) -> tuple[float, float]:
    client.xgroup_create(key, "g", id="0", mkstream=True)
    t0 = time.perf_counter()
    for i in range(0, len(blobs), batch):
        pipe = client.pipeline(transaction=False)
        for blob in blobs[i:i + batch]:
            pipe.xadd(key, {"r": blob})
        pipe.execute()
    t1 = time.perf_counter()
    got = 0
    while got < len(blobs):
        reply = client.xreadgroup("g", "c", {key: ">"}, count=batch)
        entries = reply[0][1]
        client.xack(key, "g", *[eid for eid, _ in entries])
        got += len(entries)
    t2 = time.perf_counter()
    client.delete(key)
    return t1 - t0, t2 - t1


def buffer_round(url: str, run_id: str, records, batch: int) -> tuple[float, float]:
    cfg = BufferConfig(redis=RedisConfig(url=url), run_id=run_id, capacity=len(records), put_batch=batch)
    with ExperienceBuffer.open(cfg) as buf:
        t0 = time.perf_counter()
        for i in range(0, len(records), batch):
            buf.put(records[i:i + batch])
        t1 = time.perf_counter()
        got = 0
        while got < len(records):
            b = buf.get(batch, "c", learner_version=0, block_ms=0)
            buf.ack(b)
            got += len(b)
        t2 = time.perf_counter()
        delete_run(buf.r, run_id)
    return t1 - t0, t2 - t1


TENSORS = ("prompt_token_ids", "response_token_ids", "sampling_logprobs", "ref_logprobs")


def packed_class():
    """A message holding the per-token data as packed repeated fields (proto3's default)."""
    f = descriptor_pb2.FileDescriptorProto(name="bench_packed.proto", package="bench", syntax="proto3")
    m = f.message_type.add(name="Packed")
    m.field.add(name="sample_id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    for k, name in enumerate(TENSORS, 2):
        types = descriptor_pb2.FieldDescriptorProto
        typ = types.TYPE_INT32 if k < 4 else types.TYPE_FLOAT
        m.field.add(name=name, number=k, type=typ, label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Packed"))


def decode_costs(records, rounds: int) -> dict[str, float]:
    """us per record of the learner's decode, per encoding (best of `rounds`)."""
    from instructrl.learner.batch import from_records

    packed_cls = packed_class()
    raw = [r.SerializeToString() for r in records]
    packed = [packed_cls(sample_id=r.sample_id, **{
        n: (token_array(getattr(r, n)) if n.endswith("ids") else logprob_array(getattr(r, n))).tolist()
        for n in TENSORS}).SerializeToString() for r in records]

    def tensor_bytes():
        for b in raw:
            m = experience_pb2.Experience.FromString(b)
            token_array(m.prompt_token_ids), token_array(m.response_token_ids)
            logprob_array(m.sampling_logprobs), logprob_array(m.ref_logprobs)

    def packed_repeated():
        for b in packed:
            m = packed_cls.FromString(b)
            np.array(m.prompt_token_ids, np.int32), np.array(m.response_token_ids, np.int32)
            np.array(m.sampling_logprobs, np.float32), np.array(m.ref_logprobs, np.float32)

    parsed = [experience_pb2.Experience.FromString(b) for b in raw]

    def learner_batches():
        for i in range(0, len(parsed), 64):
            from_records(parsed[i:i + 64], [0] * len(parsed[i:i + 64]), pad_id=0)

    out = {}
    for name, fn in (("tensor_bytes", tensor_bytes), ("packed_repeated", packed_repeated),
                     ("from_records", learner_batches)):
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(best / len(records) * 1e6, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()

    tag = f"bench-{uuid.uuid4().hex[:10]}"
    records = make_records(a.records, tag)
    blobs = [r.SerializeToString() for r in records]
    client = redis_from_url(a.url)
    raw_rates: list[float] = []
    buf_rates: list[float] = []
    try:
        for k in range(a.rounds):
            def raw():
                return raw_round(client, f"instructrl:{{{tag}-raw}}:experience", blobs, a.batch)

            def buf(k=k):
                return buffer_round(a.url, f"{tag}-buf{k}", records, a.batch)
            if k % 2:
                (bp, bg), (rp, rg) = buf(), raw()
            else:
                (rp, rg), (bp, bg) = raw(), buf()
            raw_rates.append(a.records / (rp + rg))
            buf_rates.append(a.records / (bp + bg))
            print(f"round {k}: raw {raw_rates[-1]:.0f} rec/s (put {rp:.3f}s get {rg:.3f}s), "
                  f"buffer {buf_rates[-1]:.0f} rec/s (put {bp:.3f}s get {bg:.3f}s)")
    finally:
        delete_run(client, f"{tag}-raw")
        for k in range(a.rounds):
            delete_run(client, f"{tag}-buf{k}")
        client.close()
    ratio = statistics.median(b / r for b, r in zip(buf_rates, raw_rates, strict=True))
    decode = decode_costs(records[:1000], a.rounds)
    print(f"learner decode, us per record: {decode}")
    print(json.dumps({
        "records": a.records, "record_bytes": len(blobs[0]), "batch": a.batch, "rounds": a.rounds,
        "buffer_records_per_s": round(statistics.median(buf_rates), 1),
        "raw_records_per_s": round(statistics.median(raw_rates), 1), "ratio": round(ratio, 3),
        "decode_us_per_record": decode,
    }))


if __name__ == "__main__":
    main()
