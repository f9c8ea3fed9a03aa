"""Validation against the runtime on a real local cluster: two CPU replicas (Ray Serve) of a
tiny random Llama serve a small multi-turn workload; each ClusterSession handle records its turns
(`Cluster.open(recorder=)`: the input's block digests, which are the stores' keys) as Mooncake
lines; simulating that trace with the same capacities (room for every block), the same routing
(prefix-affinity) and no shared tier hits exactly the blocks the replicas did not compute.

A turn's runtime hits are the whole blocks of its input the replica did not compute: the
session's own earlier blocks plus those adopted from its store (input_length minus computed
tokens, in whole blocks). Each turn's output stays inside the input's last partial block, so
every block the runtime holds is one the trace names. Timing is not checked here (a shared
machine); benchmarks/bench_simulate_validation.py compares TTFT.
"""

from __future__ import annotations

import json
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
    hit_blocks = 0
    with TraceRecorder(tmp_path / "trace.jsonl", block_tokens=BLOCK_TOKENS) as recorder:
        handles = [cluster.open(f"conv-{c}", recorder=recorder) for c in range(len(systems))]
        for turn in range(3):
            for handle, system in zip(handles, systems):
                ids = (system if turn == 0 else []) + message(rng, len(handle.tokens) + len(system) * (turn == 0), 19)
                before = handle.stats()["computed_tokens"] if handle.tokens else 0
                handle.extend(ids)
                hit_blocks += (len(handle.tokens) - (handle.stats()["computed_tokens"] - before)) // BLOCK_TOKENS
                handle.generate(NEW_TOKENS)
        replicas = {handle.replica_id for handle in handles}
        for handle in handles:
            handle.close()
    assert len(replicas) == 2  # the distinct document went to the other replica
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [line["session"] for line in lines] == [f"conv-{c}" for _ in range(3) for c in range(3)]
    assert all(line["output_length"] == NEW_TOKENS and line["ttft_s"] > 0 for line in lines)
    assert {line["replica"] for line in lines} == replicas
    trace = read_trace(tmp_path / "trace.jsonl")
    assert trace.block_tokens == BLOCK_TOKENS and len(trace.requests) == 9
    row = simulate(trace, SimConfig(workers=2, device_blocks=10_000, routing="prefix-affinity"), load_profile("cpu-local"))
    assert 0 < hit_blocks < row["blocks"]
    assert row["hit_blocks"] == hit_blocks


def test_a_recorder_of_another_block_size_is_refused(cluster, tmp_path):
    with TraceRecorder(tmp_path / "t.jsonl", block_tokens=2 * BLOCK_TOKENS) as recorder:
        with pytest.raises(ValueError, match=f"recorder counts blocks of {2 * BLOCK_TOKENS}"):
            cluster.open(recorder=recorder)
        with pytest.raises(TypeError, match="recorder"):
            cluster.open(recorder=str(tmp_path / "t.jsonl"))
