"""Continuous batching: aggregate decode tokens/s of N sessions sharing forward steps, against one.

SmolLM2-135M on this machine's CPU (or its GPU). Every session reads the same document of CONTEXT
tokens followed by a question of its own (so the sessions' outputs differ), on one worker's store:
the document's blocks are computed once and shared (content-addressed), the questions are
prefilled per session. Then each session decodes --new-tokens greedy tokens:

    one    each session alone (Session.generate), one after another: the baseline, and each
           session's reference output
    N      N sessions in one StepLoop (runtime.step_loop): every step decodes all N

Printed per context and N: aggregate decode tokens/s (median of --runs, with the range), its ratio
to one session's, the time per output token each session sees, and whether every session's tokens
equal its solo run's. Prefill is not timed.

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


def document(model, tokens: int) -> list[int]:
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text[: tokens * 6])
    assert len(ids) >= tokens, "the document is too short for this context"
    return ids[:tokens]


def prompts(model, context: int, count: int) -> list[list[int]]:
    """`count` prompts: the document, then question i (numbered, so that no two are the same)."""
    doc = document(model, context)
    return [doc + model.tokenizer.encode(f"\nQuestion {i}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")
            for i in range(count)]


def store_for(model, context: int, sessions: int) -> TieredStore:
    kv_bytes = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    device_bytes = (context + 512) * kv_bytes * sessions  # room for every session's KV on the device
    return TieredStore(model_store_config(model, StoreConfig(device_bytes=device_bytes, block_tokens=64)))


def solo(model, texts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Each prompt alone: its greedy tokens and its decode tokens/s."""
    outputs, rates = [], []
    store = store_for(model, len(texts[0]), 1)
    for text in texts:
        with Session(model, store=store) as session:
            session.extend(text)
            start_s = time.perf_counter()
            outputs.append(session.generate(new_tokens, stop=[]))
            rates.append(new_tokens / (time.perf_counter() - start_s))
    store.close()
    return outputs, rates


def batched(model, texts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    """All prompts in one StepLoop: their tokens, the aggregate decode tokens/s, the steps taken."""
    store = store_for(model, len(texts[0]), len(texts))
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
    store.close()
    return outputs, rate, loop.steps - steps_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timings per N; the median is printed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = load_model("smollm2-135m", device=args.device)
    console = Console()
    console.print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  f"torch {torch.__version__}, device {args.device}")
    table = Table("context", "sessions", "decode tok/s (median, range)", "vs one", "ms per token per session",
                  "steps", "tokens = solo")
    most = max(args.sessions)
    for context in args.contexts:
        texts = prompts(model, context, most)
        reference, solo_rates = solo(model, texts, args.new_tokens)
        one = statistics.median(solo_rates)
        table.add_row(str(context), "1 (alone)", f"{one:.1f} ({min(solo_rates):.1f}-{max(solo_rates):.1f})", "1.00x",
                      f"{1000 / one:.0f}", str(args.new_tokens), "reference")
        for count in args.sessions:
            rates, same, steps = [], True, 0
            for _ in range(args.runs):
                outputs, rate, steps = batched(model, texts[:count], args.new_tokens)
                rates.append(rate)
                same = same and outputs == reference[:count]
            rate = statistics.median(rates)
            table.add_row(str(context), str(count), f"{rate:.1f} ({min(rates):.1f}-{max(rates):.1f})", f"{rate / one:.2f}x",
                          f"{1000 * count / rate:.0f}", str(steps), "yes" if same else "NO")
        console.print(table)


if __name__ == "__main__":
    main()
