"""Sparse-mode quality: passkeys found at 25% and 12.5% token budgets, against exact attention.

20 keys (seeded random five-digit numbers) at depths spread over 0.05-0.95 of a ~2K-token
haystack of the shipped Shakespeare, SmolLM2-135M, the default StoreConfig (64-token blocks).
For each key one store holds the prompt: the exact session computes it, and each sparse session
adopts its blocks by content (prefix reuse), so only the decode steps differ. A key counts as
found when the greedy answer contains it.

    python benchmarks/bench_passkey.py                    # 20 keys, quest
    python benchmarks/bench_passkey.py --keys 8 --importance quest --dense-layers 0
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from runtime import Session, load_model
from runtime.passkey import passkey_prompt, passkeys
from tiered import StoreConfig, TieredStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--importance", default="quest")
    parser.add_argument("--budgets", default="0.25,0.125", help="fractions of the prompt each KV head reads")
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model()
    fractions = [float(f) for f in args.budgets.split(",")]
    found = {"exact": 0, **{f: 0 for f in fractions}}
    misses: dict = {f: [] for f in fractions}
    start_s = time.perf_counter()
    for key, depth in tqdm(passkeys(args.keys), desc="passkeys", unit="key"):
        ids = passkey_prompt(model.tokenizer, key, depth)
        with TieredStore(StoreConfig(device="cpu", layers=model.config.num_layers, fingerprint=model.fingerprint)) as store:
            with Session(model, store=store) as session:
                session.extend(ids)
                found["exact"] += key in model.tokenizer.decode(session.generate(args.answer_tokens))
            for fraction in fractions:
                options = dict(mode="sparse", budget_tokens=int(len(ids) * fraction) // args.page_tokens * args.page_tokens,
                               importance=args.importance, dense_layers=args.dense_layers, page_tokens=args.page_tokens)
                with Session(model, store=store, **options) as session:
                    session.extend(ids)
                    assert session.stats()["reused_tokens"] > len(ids) - 64
                    answer = model.tokenizer.decode(session.generate(args.answer_tokens))
                if key in answer:
                    found[fraction] += 1
                else:
                    misses[fraction].append(f"{depth:.2f}:{answer.strip()[:12]!r}")
    table = Table(title=f"passkeys found of {args.keys} ({args.importance}, dense_layers={args.dense_layers}, "
                        f"page_tokens={args.page_tokens})")
    for column in ("set-up", "found", "misses (depth: answer)"):
        table.add_column(column)
    table.add_row("exact", f"{found['exact']}/{args.keys}", "")
    for fraction in fractions:
        table.add_row(f"sparse {fraction:.1%}", f"{found[fraction]}/{args.keys}", " ".join(misses[fraction]))
    Console(width=160).print(table)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{time.perf_counter() - start_s:.0f} s")


if __name__ == "__main__":
    main()
