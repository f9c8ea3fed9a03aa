"""Simulation against the runtime: predicted vs measured time to first token on a local cluster.

Two CPU replicas (Ray Serve) of the default model serve a small multi-turn workload, one request
at a time: conversations over a shared system prompt (and one over its own), each turn a new
message, then a few generated tokens. The driver records every turn from its ClusterSession
handle (arrival, input, the input's block hashes, output) with a TraceRecorder, and measures
its TTFT: from the turn's arrival to its first streamed token. The recorded trace is then
simulated with the calibrated profile of this machine (`tiered simulate --calibrate`, run here
first unless --profile names one), the same capacities (room for every block), the same
routing (prefix-affinity) and no shared tier. Printed: hit ratios (simulated, runtime) and
TTFT p50 (predicted, measured); the goal is the predicted p50 within 25% of the measured one.

    python benchmarks/bench_simulate_validation.py                    # calibrate, then run
    python benchmarks/bench_simulate_validation.py --profile cpu-local  # the shipped profile
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from runtime import Cluster
from runtime.actors import start_ray
from runtime.simulate import SimConfig, load_profile, read_trace, simulate
from runtime.simulate.calibrate import calibrate
from runtime.trace_recorder import TraceRecorder
from tiered import StoreConfig

GOAL = 0.25


def message(rng: random.Random, history_tokens: int, length: int, block_tokens: int) -> list[int]:
    """`length` or a few more tokens, so that the input ends 1 token into a block (then the
    output stays in that block, and every block the runtime caches is one the trace names)."""
    return [rng.randrange(3, 30000) for _ in range(length + (1 - history_tokens - length) % block_tokens)]


def run_workload(args, trace_path: Path) -> tuple[list[float], int, int]:
    """Serve the workload on the cluster; (TTFT seconds per turn, runtime hit blocks, blocks)."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 30000) for _ in range(args.system_tokens)]
    systems = [shared] * (args.conversations - 1) + [[rng.randrange(3, 30000) for _ in range(args.system_tokens)]]
    config = StoreConfig(device="cpu", device_bytes=256 << 20, host_bytes=256 << 20, block_tokens=args.block_tokens)
    ttfts_s, hit_blocks, blocks = [], 0, 0
    start_ray("local")
    with Cluster(model=args.model, workers=2, store_config=config, call_timeout_s=600) as cluster:
        handles = [cluster.open(f"conv-{c}") for c in range(len(systems))]
        with TraceRecorder(trace_path, block_tokens=args.block_tokens) as recorder:
            for turn in range(args.turns):
                for handle, system in zip(handles, systems):
                    head = system if turn == 0 else []
                    ids = head + message(rng, len(handle.tokens) + len(head), args.message_tokens, args.block_tokens)
                    before = handle.stats()["computed_tokens"] if handle.tokens else 0
                    arrival_s = recorder.now_s()
                    handle.extend(ids)
                    stream = handle.stream(args.new_tokens)
                    next(stream)
                    ttft_s = recorder.now_s() - arrival_s
                    inputs = handle.tokens[: len(handle.tokens) - 1]
                    hashes = [bytes.fromhex(h) for h in handle.block_hashes[: len(inputs) // args.block_tokens]]
                    produced = 1 + sum(1 for _ in stream)
                    computed = handle.stats()["computed_tokens"] - before - produced  # the turn's prefill alone
                    recorder.record(inputs, produced, arrival_s=arrival_s, block_digests=hashes, ttft_s=ttft_s)
                    ttfts_s.append(ttft_s)
                    hit_blocks += (len(inputs) - computed) // args.block_tokens
                    blocks += len(hashes)
        for handle in handles:
            handle.close()
    return ttfts_s, hit_blocks, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default=None, help="a profile name or YAML; default: calibrate this machine now")
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=384)
    parser.add_argument("--message-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        profile_path = args.profile or calibrate(Path(scratch) / "cpu-local.yaml", model_name=args.model)
        profile = load_profile(str(profile_path))
        started = time.perf_counter()
        ttfts_s, hit_blocks, blocks = run_workload(args, Path(scratch) / "trace.jsonl")
        served_s = time.perf_counter() - started
        trace = read_trace(Path(scratch) / "trace.jsonl")
    row = simulate(trace, SimConfig(workers=2, device_blocks=100_000, routing="prefix-affinity"), profile)
    measured, predicted = statistics.median(ttfts_s), row["ttft_p50_s"]
    error = abs(predicted - measured) / measured
    print(f"{len(ttfts_s)} turns on 2 replicas of {args.model} in {served_s:.1f} s; profile {profile.name} "
          f"({profile.prefill_s_per_token * 1e3:.2f} ms/token, {profile.prefill_overhead_s * 1e3:.0f} ms/prefill)")
    print(f"hit ratio   simulated {row['hit_ratio']:.4f}   runtime {hit_blocks / blocks:.4f}   "
          f"({row['hit_blocks']} vs {hit_blocks} of {blocks} blocks)")
    print(f"TTFT p50    predicted {predicted:.3f} s   measured {measured:.3f} s   "
          f"(measured range {min(ttfts_s):.3f}-{max(ttfts_s):.3f} s)   error {error:.0%}   "
          f"{'within' if error <= GOAL else 'outside'} {GOAL:.0%}")


if __name__ == "__main__":
    main()
