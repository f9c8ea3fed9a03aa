"""Simulation speed: the whole Mooncake conversation trace (12,031 requests, 288,500 blocks) on
8 workers, per eviction policy; the goal is under 10 s per configuration on a 2-core machine.

Each row is one `tiered simulate` configuration, timed without reading the trace (read once,
timed apart): 8 workers, 1,024 device and 4,096 host blocks each, write-back, prefix-affinity
routing, the H200 profile. Each configuration runs --runs times (default 3): the median and the
range of wall and CPU seconds are shown, since a shared machine inflates the wall clock.

    python benchmarks/bench_simulate.py                      # every eviction policy
    python benchmarks/bench_simulate.py --eviction lru       # one
    python benchmarks/bench_simulate.py --trace other.jsonl  # another trace
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from policies import EVICTION
from runtime.simulate import SimConfig, load_profile, read_trace, simulate

TRACE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mooncake_conversation_trace.jsonl.gz"
GOAL_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--eviction", default=",".join(EVICTION), help="comma-separated policy names")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device-blocks", type=int, default=1024)
    parser.add_argument("--host-blocks", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median and range shown)")
    args = parser.parse_args()
    started = time.perf_counter()
    trace = read_trace(args.trace)
    read_s = time.perf_counter() - started
    profile = load_profile("h200-nvlink-c2c")
    table = Table(
        title=f"{len(trace.requests)} requests, {trace.blocks} blocks, {args.workers} workers "
        f"(read in {read_s:.2f} s) on {platform.processor() or platform.machine()}"
    )
    for column in ("eviction", "wall s (median)", "wall s (range)", "cpu s (median)", "cpu s (range)",
                   "requests/s", "hit ratio", f"< {GOAL_S:.0f} s"):
        table.add_column(column, justify="right")
    for name in args.eviction.split(","):
        config = SimConfig(
            workers=args.workers, device_blocks=args.device_blocks, host_blocks=args.host_blocks, eviction=name
        )
        walls, cpus = [], []
        for _ in range(args.runs):
            wall, cpu = time.perf_counter(), time.process_time()
            row = simulate(trace, config, profile)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        wall_s, cpu_s = statistics.median(walls), statistics.median(cpus)
        table.add_row(
            name, f"{wall_s:.2f}", f"{min(walls):.2f}–{max(walls):.2f}", f"{cpu_s:.2f}", f"{min(cpus):.2f}–{max(cpus):.2f}",
            f"{len(trace.requests) / wall_s:,.0f}", f"{row['hit_ratio']:.4f}", "yes" if wall_s < GOAL_S else "no",
        )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
