"""Validation against the runtime: sessions on two replicas (two stores, requests dealt
round-robin, as a stateless server opens a session per request with the whole history) serve a
small multi-turn workload while a TraceRecorder records it; the simulation of the recorded
trace, with the same routing and room enough for every block, hits exactly the blocks the
sessions reused.

The same check through Session(recorder=...) with a tiny model is in
test_simulate_session_trace.py, on a Ray Serve cluster of two replicas in
test_simulate_cluster_trace.py; the TTFT comparison (predicted p50 within 25% of the measured)
is benchmarks/bench_simulate_validation.py, since timing is not asserted on a shared machine.
"""

from __future__ import annotations

import random

from runtime import Session
from runtime.session import model_store_config
from runtime.simulate import SimConfig, load_profile, read_trace, simulate
from runtime.trace_recorder import TraceRecorder
from tiered import StoreConfig, TieredStore

BLOCK_TOKENS = 16


def test_simulated_hits_equal_the_sessions_reuse(smollm2, tmp_path):
    rng = random.Random(0)
    vocab = smollm2.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(40)]
    histories = {c: list(system) for c in range(3)}
    requests = []
    for turn in range(3):
        for conversation in range(3):
            message = [rng.randrange(vocab) for _ in range(21)]
            histories[conversation] += message
            if len(histories[conversation]) % BLOCK_TOKENS == 0:  # the runtime computes the last token's block
                histories[conversation].append(rng.randrange(vocab))
            requests.append(list(histories[conversation]))
    config = StoreConfig(device="cpu", device_bytes=64 << 20, host_bytes=64 << 20, block_tokens=BLOCK_TOKENS)
    stores = [TieredStore(model_store_config(smollm2, config)) for _ in range(2)]
    sessions, reused_tokens = [], 0
    try:
        with TraceRecorder(tmp_path / "trace.jsonl", block_tokens=BLOCK_TOKENS) as recorder:
            for index, log in enumerate(requests):
                session = Session(smollm2, store=stores[index % 2])  # round-robin over the replicas
                sessions.append(session)
                session.extend(log)
                stats = session.stats()
                reused_tokens += stats["reused_tokens"]
                recorder.record(log, 0, ttft_s=stats["prefill_s"], reused_tokens=stats["reused_tokens"])
    finally:
        for session in sessions:
            session.close()
        for store in stores:
            store.close()
    trace = read_trace(tmp_path / "trace.jsonl")
    assert trace.block_tokens == BLOCK_TOKENS and len(trace.requests) == 9
    profile = load_profile("cpu-local")
    row = simulate(trace, SimConfig(workers=2, device_blocks=10_000, routing="round-robin"), profile)
    assert reused_tokens > 0
    assert row["hit_blocks"] * BLOCK_TOKENS == reused_tokens
    together = simulate(trace, SimConfig(workers=1, device_blocks=10_000), profile)
    assert together["hit_blocks"] > row["hit_blocks"]  # one replica would have reused more
