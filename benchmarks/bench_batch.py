"""Continuous batching: aggregate decode tokens/s of N sessions sharing forward steps, against one.

SmolLM2-135M on this machine's CPU (or its GPU). Every session reads a document of CONTEXT tokens
(its own stretch of the text; with --shared-document all read the same one, whose blocks are then
computed once and shared, content-addressed) and a question of its own, on one worker's store.
Then each session decodes --new-tokens greedy tokens:

    one    each session alone (Session.generate), one after another: the baseline, and each
           session's reference output
    N      N sessions in one StepLoop (runtime.step_loop): every step decodes all N

Printed per context and N: aggregate decode tokens/s (median of --runs, with the range), its ratio
to one session's, the time per output token each session sees, and whether every session's tokens
equal its solo run's. Prefill is not timed (the prompts' blocks stay cached in the store, so later
runs adopt them instead of computing them again).

    python benchmarks/bench_batch.py                                  # 1K and 4K; 1, 2, 4, 8, 16 sessions
    python benchmarks/bench_batch.py --contexts 1024 --sessions 1 8 --runs 3 --new-tokens 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from importlib import resources

import torch
from rich.console import Console
from rich.table import Table

from runtime import Session, load_model
from runtime.session import model_store_config
from runtime.step_loop import StepLoop
from tiered import StoreConfig, TieredStore

QUESTIONS = ("Who speaks first?", "Summarize the scene.", "What does the crowd want?", "Name the city.",
             "Who is Menenius?", "Why are they angry?", "What happens next?", "Quote a line.")


def document(model, tokens: int, number: int = 0) -> list[int]:
    """`tokens` tokens of the text, from the `number`-th stretch of it."""
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    start = number * tokens * 5
    ids = model.tokenizer.encode(text[start : start + tokens * 6])
    assert len(ids) >= tokens, "the text is too short for this many documents of this context"
    return ids[:tokens]


def prompts(model, context: int, count: int, shared: bool = False) -> list[list[int]]:
    """`count` prompts: a document (their own, or one for all), then question i (numbered)."""
    return [document(model, context, 0 if shared else i)
            + model.tokenizer.encode(f"\nQuestion {i}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:") for i in range(count)]


def store_for(model, context: int, sessions: int) -> TieredStore:
    kv_bytes = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    # room on the device for every session's KV twice over: the live sessions' and what earlier runs left cached
    device_bytes = 2 * (context + 512) * kv_bytes * sessions
    return TieredStore(model_store_config(model, StoreConfig(device_bytes=device_bytes, block_tokens=64)))


def solo(model, store: TieredStore, texts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Each prompt alone: its greedy tokens and its decode tokens/s."""
    outputs, rates = [], []
    for text in texts:
        with Session(model, store=store) as session:
            session.extend(text)
            start_s = time.perf_counter()
            outputs.append(session.generate(new_tokens, stop=[]))
            rates.append(new_tokens / (time.perf_counter() - start_s))
    return outputs, rates


def batched(model, store: TieredStore, texts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    """All prompts in one StepLoop: their tokens, the aggregate decode tokens/s, the steps taken."""
    loop = StepLoop(model)
    sessions = [Session(model, store=store) for _ in texts]
    extends = [loop.extend(session, text) for session, text in zip(sessions, texts)]
    while not all(request.finished for request in extends):
        loop.step()
    for request in extends:
        request.result()
    streams = [loop.stream(session, new_tokens, stop=[]) for session in sessions]
    steps_before = loop.steps
    start_s = time.perf_counter()
    loop.run()
    rate = len(texts) * new_tokens / (time.perf_counter() - start_s)
    outputs = [list(request.tokens()) for request in streams]
    for session in sessions:
        session.close()
    return outputs, rate, loop.steps - steps_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timings per N; the median is printed")
    parser.add_argument("--shared-document", action="store_true", help="every session reads the same document")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m", device=args.device)
    console = Console(width=160)  # the ranges are not cut when the output is not a terminal
    console.print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}, device {args.device}")
    table = Table("context", "sessions", "decode tok/s (median, range)", "vs one", "ms per token per session",
                  "steps", "tokens = solo")
    most = max(args.sessions)
    for context in args.contexts:
        texts = prompts(model, context, most, args.shared_document)
        store = store_for(model, context, most)  # the prompts' blocks stay cached: later runs adopt them
        reference, solo_rates = solo(model, store, texts, args.new_tokens)
        one = statistics.median(solo_rates)
        table.add_row(str(context), "1 (alone)", f"{one:.1f} ({min(solo_rates):.1f}-{max(solo_rates):.1f})", "1.00x",
                      f"{1000 / one:.0f}", str(args.new_tokens), "reference")
        for count in args.sessions:
            rates, same, steps = [], True, 0
            for _ in range(args.runs):
                outputs, rate, steps = batched(model, store, texts[:count], args.new_tokens)
                rates.append(rate)
                same = same and outputs == reference[:count]
            rate = statistics.median(rates)
            table.add_row(str(context), str(count), f"{rate:.1f} ({min(rates):.1f}-{max(rates):.1f})", f"{rate / one:.2f}x",
                          f"{1000 * count / rate:.0f}", str(steps), "yes" if same else "NO")
        store.close()
        console.print(table)


if __name__ == "__main__":
    main()
