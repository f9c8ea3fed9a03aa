"""`tiered experiment`: compare importance and prefetch policies on a trace -> CSV + PNG plots.

`--trace FILE` replays a recorded trace (runtime/traces.py); `--synthetic` draws one with the
structure real models show (policies/trace/synthetic.py), saves it next to the results, and
replays it. The replay itself is policies.trace.replay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from policies import IMPORTANCE, PREFETCH
from policies.trace import SyntheticConfig, synthetic_trace
from policies.trace.replay import ReplayConfig, replay, summarize

from ..experiment_report import plot_prefetch, plot_recall, write_csv
from ..traces import load_trace, save_trace
from .checks import creatable_dir, model, non_negative_int, positive_int, readable_file
from .options import names


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="compare importance and prefetch policies on an attention trace (CSV + PNG)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, metavar="FILE", help="replay this trace file (.npz)")
    source.add_argument("--synthetic", action="store_true", help="draw a synthetic trace, save it, and replay it")
    source.add_argument(
        "--capture", action="store_true", help="record a trace from the model on the document, save it, and replay it"
    )
    parser.add_argument(
        "--out", type=creatable_dir, default=Path("out/experiment"), help="directory for results.csv and the plots"
    )
    parser.add_argument(
        "--budgets", type=_fractions, default=(0.125, 0.25, 0.5), help="comma-separated fractions of the context"
    )
    parser.add_argument(
        "--importance",
        type=names(IMPORTANCE),
        default=tuple(IMPORTANCE),
        help=f"comma-separated, of {sorted(IMPORTANCE)}",
    )
    parser.add_argument(
        "--prefetch", type=names(PREFETCH), default=tuple(PREFETCH), help=f"comma-separated, of {sorted(PREFETCH)}"
    )
    parser.add_argument("--sink-blocks", type=non_negative_int, default=1)
    parser.add_argument("--window-blocks", type=non_negative_int, default=2)
    parser.add_argument(
        "--feedback",
        choices=("kept", "all"),
        default="kept",
        help="what attention the estimators learn from: the kept blocks (sparse mode) or all (exact mode)",
    )
    synthetic = parser.add_argument_group("synthetic trace")
    synthetic.add_argument("--seed", type=non_negative_int, default=0)
    synthetic.add_argument("--layers", type=positive_int, default=SyntheticConfig.layers)
    synthetic.add_argument("--prompt-tokens", type=positive_int, default=SyntheticConfig.prompt_tokens)
    synthetic.add_argument("--steps", type=positive_int, default=SyntheticConfig.steps, help="decode steps")
    synthetic.add_argument("--block-tokens", type=positive_int, default=SyntheticConfig.block_tokens)
    capture = parser.add_argument_group("captured trace (also --steps, --prompt-tokens and --block-tokens)")
    capture.add_argument("--model", type=model, default="smollm2-135m", help="registered name, .gguf file or HF directory")
    capture.add_argument("--document", type=readable_file, default=None, help="text file (default: the shipped Shakespeare)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = ReplayConfig(
        importance=args.importance,
        prefetch=args.prefetch,
        budgets=args.budgets,
        sink_blocks=args.sink_blocks,
        window_blocks=args.window_blocks,
        feedback=args.feedback,
    )
    if args.synthetic:
        synthetic = SyntheticConfig(
            layers=args.layers,
            prompt_tokens=args.prompt_tokens,
            steps=args.steps,
            block_tokens=args.block_tokens,
            seed=args.seed,
        )
        trace = synthetic_trace(synthetic)
        args.out.mkdir(parents=True, exist_ok=True)
        trace_path = save_trace(trace, args.out / "trace.npz")
        print(f"synthetic trace: {trace_path}")
    elif args.capture:
        trace = _capture(args)
        trace_path = save_trace(trace, args.out / "trace.npz")
        print(f"captured trace: {trace_path}")
    else:
        try:
            trace = load_trace(args.trace)
        except (ValueError, FileNotFoundError) as err:
            print(f"tiered experiment: error: argument --trace: {err}", file=sys.stderr)
            return 2
        trace_path = args.trace
    print(
        f"{trace.steps - trace.observe_steps} decode steps (+{trace.observe_steps} observed), {trace.layers} layers, "
        f"{trace.heads} heads / {trace.kv_heads} KV heads, "
        f"{int(trace.tokens.max())} tokens in blocks of {trace.block_tokens}"
    )
    total = len(config.budgets) * len(config.importance) * trace.steps * trace.layers
    with tqdm(total=total, desc="replaying", unit="layer-step") as bar:
        rows = replay(trace, config, progress=bar.update)
    title = f"{Path(trace_path).name}: {trace.info.get('source', 'trace')}, feedback={config.feedback}"
    focus = "quest" if "quest" in config.importance else config.importance[0]
    outputs = [
        write_csv(rows, args.out / "results.csv"),
        plot_recall(rows, args.out / "recall.png", title),
        plot_prefetch(rows, args.out / "prefetch.png", focus, title),
    ]
    _print_tables(rows, config, focus)
    for path in outputs:
        print(f"wrote {path}")
    return 0


def _capture(args: argparse.Namespace):
    from importlib import resources

    from ..capture import capture_trace
    from ..model import load_model

    model = load_model(args.model)
    document = args.document or Path(str(resources.files("runtime") / "data" / "tinyshakespeare.txt"))
    prompt = model.tokenizer.encode(document.read_text(encoding="utf-8")[: args.prompt_tokens * 8])[: args.prompt_tokens]
    print(f"capturing {args.steps} decode steps of {args.model} after {len(prompt)} tokens ...", flush=True)
    return capture_trace(model, prompt, steps=args.steps, block_tokens=args.block_tokens)


def _print_tables(rows: list[dict], config: ReplayConfig, focus: str) -> None:
    budgets = config.budgets
    header = "".join(f"{100 * b:>14.1f}%" for b in budgets)
    print(f"\nattention-mass recall / top-k recall by budget\n{'importance':<12}{header}")
    mass, topk = summarize(rows, "mass_recall", config.prefetch[0]), summarize(rows, "topk_recall", config.prefetch[0])
    for name in config.importance:
        print(f"{name:<12}" + "".join(f"{mass[(name, b)]:>8.3f} /{topk[(name, b)]:.2f}" for b in budgets))
    print(f"\nprefetch hit rate / MiB moved by budget (blocks chosen by {focus})\n{'prefetch':<12}{header}")
    for name in config.prefetch:
        hit, moved = summarize(rows, "hit_rate", name), summarize(rows, "bytes_moved", name)
        print(f"{name:<12}" + "".join(f"{hit[(focus, b)]:>7.3f} /{moved[(focus, b)] / 2**20:5.1f}" for b in budgets))


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions such as 0.125,0.25, got {text!r}"
        ) from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    return values
