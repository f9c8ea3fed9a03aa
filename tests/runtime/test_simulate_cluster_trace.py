"""Validation against the runtime on a real local cluster: two CPU replicas (Ray Serve) of a
tiny random Llama serve a small multi-turn workload; the driver records each turn from its
ClusterSession handle (the input's block_hashes, which are the stores' keys) as a Mooncake
line; simulating that trace with the same capacities (room for every block), the same routing
(prefix-affinity) and no shared tier hits exactly the blocks the replicas did not compute.

A turn's runtime hits are the whole blocks of its input the replica did not compute: the
session's own earlier blocks plus those adopted from its store (input_length minus computed
tokens, in whole blocks). Each turn's output stays inside the input's last partial block, so
every block the runtime holds is one the trace names. Timing is not checked here (a shared
machine); benchmarks/bench_simulate_validation.py compares TTFT.
"""

from __future__ import annotations

import random

import pytest
import ray  # the serve extra is a dependency: a missing one fails, never skips
from ray import serve

from runtime import Cluster
from runtime.actors import start_ray
from runtime.simulate import SimConfig, load_profile, read_trace, simulate
from runtime.trace_recorder import TraceRecorder
from tiered import StoreConfig

from .tiny_models import write_hf_dir

BLOCK_TOKENS, NEW_TOKENS = 16, 6
CONFIG = StoreConfig(device="cpu", device_bytes=16 << 20, host_bytes=16 << 20, block_tokens=BLOCK_TOKENS)
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-cluster")
    write_hf_dir(directory, "llama", seed=3)
    start_ray("local", num_cpus=4)
    try:
        with Cluster(model=str(directory), workers=2, store_config=CONFIG, call_timeout_s=120) as running:
            yield running
    finally:
        serve.shutdown()
        ray.shutdown()


def message(rng: random.Random, history_tokens: int, length: int) -> list[int]:
    """`length` or a few more random tokens, so that the input ends 1 token into a block."""
    return [rng.randrange(3, 500) for _ in range(length + (1 - history_tokens - length) % BLOCK_TOKENS)]


def test_simulated_hits_equal_the_clusters_on_its_recorded_trace(cluster, tmp_path):
    rng = random.Random(1)
    shared_system = [rng.randrange(3, 500) for _ in range(40)]
    systems = [shared_system, shared_system, [rng.randrange(3, 500) for _ in range(50)]]
    handles = [cluster.open(f"conv-{c}") for c in range(len(systems))]
    hit_blocks = 0
    with TraceRecorder(tmp_path / "trace.jsonl", block_tokens=BLOCK_TOKENS) as recorder:
        for turn in range(3):
            for handle, system in zip(handles, systems):
                ids = (system if turn == 0 else []) + message(rng, len(handle.tokens) + len(system) * (turn == 0), 19)
                before = handle.stats()["computed_tokens"] if handle.tokens else 0
                arrival_s = recorder.now_s()
                handle.extend(ids)
                computed = handle.stats()["computed_tokens"] - before
                ttft_s = recorder.now_s() - arrival_s
                inputs, hashes = list(handle.tokens), handle.block_hashes
                handle.generate(NEW_TOKENS)
                recorder.record(inputs, NEW_TOKENS, arrival_s=arrival_s, block_digests=[bytes.fromhex(h) for h in hashes],
                                ttft_s=ttft_s, session=handle.session_id, replica=handle.replica_id)  # fmt: skip
                hit_blocks += (len(inputs) - computed) // BLOCK_TOKENS
    replicas = {handle.replica_id for handle in handles}
    for handle in handles:
        handle.close()
    assert len(replicas) == 2  # the distinct document went to the other replica
    trace = read_trace(tmp_path / "trace.jsonl")
    assert trace.block_tokens == BLOCK_TOKENS and len(trace.requests) == 9
    row = simulate(trace, SimConfig(workers=2, device_blocks=10_000, routing="prefix-affinity"), load_profile("cpu-local"))
    assert 0 < hit_blocks < row["blocks"]
    assert row["hit_blocks"] == hit_blocks
