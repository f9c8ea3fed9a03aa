"""The matrix multiplications of one forward step of SmolLM2-135M: F.linear (MKL) against weights
prepacked for oneDNN (runtime.model.packed), for steps of 1 to 512 rows, and what they bound.

Each step multiplies every weight of the model once (30 layers' qkv, out, gate_up and down, and
the vocabulary projection) by ROWS rows: one row per sequence in a batched decode step, a chunk's
tokens in a prefill. Printed per row count: the milliseconds of each path (median of --runs, with
the range), packed / F.linear, and `bound`: N x t(1 row) / t(N rows) with the path the model takes
(F.linear for one row, packed for more): the most N sessions' batched decode could gain over one
session if attention and everything else cost nothing (benchmarks/bench_batch.py measures the
real ratio).

    taskset -c 1 python benchmarks/bench_packed.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from runtime import load_model
from runtime.model.packed import PACKING


def step_ms(model, rows: int, packed: bool) -> float:
    """Milliseconds of one step's matrix multiplications over `rows` rows."""
    linears = [linear for layer in model._linears for linear in (layer.qkv, layer.out, layer.gate_up, layer.down)]
    linears.append(model._vocab)
    inputs = [torch.randn(rows, linear.weight.shape[1]) for linear in linears]  # each [rows, in]
    start_s = time.perf_counter()
    with torch.inference_mode():
        for linear, x in zip(linears, inputs):
            (linear.over_packed if packed else linear.unpacked)(x)
    return 1000 * (time.perf_counter() - start_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 512])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if not PACKING:
        raise SystemExit("this torch build has no oneDNN linear ops: nothing to compare")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    times: dict[tuple[int, bool], list[float]] = {(rows, packed): [] for rows in args.rows for packed in (False, True)}
    for _ in range(args.runs):  # interleaved, so both paths see the same machine
        for (rows, packed), values in times.items():
            values.append(step_ms(model, rows, packed))
    median = {key: statistics.median(values) for key, values in times.items()}
    console = Console(width=160)
    console.print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    table = Table("rows", "F.linear ms (median, range)", "packed ms (median, range)", "packed / F.linear", "bound")
    one_ms = median[1, False] if 1 in args.rows else None
    for rows in args.rows:
        plain, packed = times[rows, False], times[rows, True]
        taken_ms = median[rows, False] if rows == 1 else median[rows, True]
        bound = f"{rows * one_ms / taken_ms:.2f}x" if one_ms else "-"
        table.add_row(str(rows), f"{median[rows, False]:.1f} ({min(plain):.1f}-{max(plain):.1f})",
                      f"{median[rows, True]:.1f} ({min(packed):.1f}-{max(packed):.1f})",
                      f"{median[rows, True] / median[rows, False]:.2f}", bound)
    console.print(table)


if __name__ == "__main__":
    main()
