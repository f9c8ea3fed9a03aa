"""`tiered simulate`: trace-driven simulation of a cluster's KV tiers -> results.csv + PNG plots.

`--trace FILE` reads a Mooncake-format JSONL trace (or one our runtime recorded); `--synthetic`
draws a multi-turn chat trace and saves it next to the results. Options that take a list
(comma-separated) sweep: every combination is one row of results.csv. `--calibrate` measures
this machine and writes a hardware profile instead (runtime/simulate/calibrate.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from policies import EVICTION, ROUTING, WRITE

from ..simulate import load_profile, read_trace, simulate, write_trace
from ..simulate.config import sweep
from ..simulate.plots import plot_hit_ratio, plot_ttft, plot_write
from ..simulate.results import print_summary, write_csv
from ..simulate.synthetic import SyntheticTrace, synthetic_trace
from .checks import creatable_dir, non_negative_int, positive_int, readable_file
from .options import names


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="simulate a cluster's KV tiers on a request trace (CSV + PNG)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", type=readable_file, metavar="FILE", help="a Mooncake-format JSONL trace (.jsonl, .jsonl.gz)")
    source.add_argument("--synthetic", action="store_true", help="draw a multi-turn chat trace, save it, simulate it")
    source.add_argument("--calibrate", action="store_true", help="measure this machine and write a hardware profile")
    parser.add_argument("--out", type=creatable_dir, default=Path("out/simulate"), help="directory for results.csv and plots")
    parser.add_argument("--block-tokens", type=positive_int, default=None, help="tokens per hash id (default: the trace's)")
    parser.add_argument("--limit", type=positive_int, default=None, help="simulate only the first N requests")
    cluster = parser.add_argument_group("cluster (comma-separated values sweep)")
    cluster.add_argument("--workers", type=_ints(1), default=(1,), help="replicas")
    cluster.add_argument("--device-blocks", type=_ints(0), default=(4096,), help="device tier per worker, in blocks")
    cluster.add_argument("--host-blocks", type=_ints(0), default=(0,), help="host tier per worker, in blocks (0: none)")
    cluster.add_argument("--disk-blocks", type=_ints(0), default=(0,), help="shared tier, in blocks (0: none)")
    cluster.add_argument("--eviction", type=names(EVICTION), default=("lru",), help=f"of {sorted(EVICTION)}")
    cluster.add_argument("--host-eviction", type=names(EVICTION), default=(None,), help="host tier's, else --eviction")
    cluster.add_argument("--disk-eviction", type=names(EVICTION), default=(None,), help="shared tier's, else --eviction")
    cluster.add_argument("--write", type=names(WRITE), default=("write-back",), help=f"of {sorted(WRITE)}")
    cluster.add_argument("--hit-threshold", type=_ints(1), default=(2,), help="reads before a selective write")
    cluster.add_argument("--routing", type=names(ROUTING), default=("prefix-affinity",), help=f"of {sorted(ROUTING)}")
    cluster.add_argument("--profile", type=_profiles, default=("h200-nvlink-c2c",), help="profile names or YAML paths")
    synthetic = parser.add_argument_group("synthetic trace")
    synthetic.add_argument("--conversations", type=positive_int, default=SyntheticTrace.conversations)
    synthetic.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="write results.csv only")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    prog = "tiered simulate"
    if args.calibrate:
        from ..simulate.calibrate import calibrate

        path = calibrate(args.out / "calibrated.yaml", progress=lambda text: print(text, flush=True))
        print(f"wrote {path}")
        return 0
    if args.synthetic:
        spec = SyntheticTrace(conversations=args.conversations, seed=args.seed, block_tokens=args.block_tokens or 512)
        trace = synthetic_trace(spec)
        print(f"synthetic trace: {write_trace(trace, args.out / 'trace.jsonl')}")
    elif args.trace is not None:
        try:
            trace = read_trace(args.trace, args.block_tokens)
        except FileNotFoundError:
            print(f"{prog}: error: argument --trace: no such file: {args.trace}", file=sys.stderr)
            return 2
        except ValueError as err:
            print(f"{prog}: error: argument --trace: {err}", file=sys.stderr)
            return 2
    else:
        print(f"{prog}: error: one of --trace, --synthetic or --calibrate is required", file=sys.stderr)
        return 2
    if args.limit is not None:
        trace = type(trace)(trace.requests[: args.limit], trace.block_tokens, trace.source)
    if not trace.requests:
        print(f"{prog}: error: argument --trace: the trace has no requests", file=sys.stderr)
        return 2
    profiles = {name: load_profile(name) for name in args.profile}
    configs = sweep(
        workers=args.workers,
        device_blocks=args.device_blocks,
        host_blocks=args.host_blocks,
        disk_blocks=args.disk_blocks,
        eviction=args.eviction,
        host_eviction=args.host_eviction,
        disk_eviction=args.disk_eviction,
        write=args.write,
        hit_threshold=args.hit_threshold if "write-through-selective" in args.write else (2,),
        routing=args.routing,
        profile=tuple(profiles),
    )
    print(
        f"{len(trace.requests)} requests over {trace.duration_s:.0f} s, {trace.blocks} blocks of "
        f"{trace.block_tokens} tokens; {len(configs)} configuration(s)"
    )
    rows, started = [], time.perf_counter()
    with tqdm(total=len(configs) * len(trace.requests), desc="simulating", unit="req") as bar:
        for config in configs:
            rows.append(simulate(trace, config, profiles[config.profile], progress=bar.update))
    elapsed_s = time.perf_counter() - started
    outputs = [write_csv(rows, args.out / "results.csv")]
    if not args.no_plots:
        title = f"{Path(trace.source).name}: {len(trace.requests)} requests"
        for plot, name in ((plot_hit_ratio, "hit_ratio.png"), (plot_ttft, "ttft.png"), (plot_write, "write.png")):
            path = plot(rows, args.out / name, title)
            if path is not None:
                outputs.append(path)
    print_summary(rows)
    print(f"simulated {len(configs)} configuration(s) in {elapsed_s:.1f} s")
    for path in outputs:
        print(f"wrote {path}")
    return 0


def _ints(minimum: int):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 1024,4096, got {text!r}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {text!r}")
        return values

    return parse


def _profiles(text: str) -> tuple[str, ...]:
    found = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in found or (text,):
        try:
            load_profile(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return found
