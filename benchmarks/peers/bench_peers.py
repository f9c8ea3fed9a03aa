"""kvpress presses against our sparse tiering on SmolLM2-135M: passkeys found and perplexity at the
same KV fractions, in one run (issue 11). Runs in the peers' venv (`make peers`).

Rows, at each fraction f of the prompt (default 25% and 12.5%):
- exact (transformers) and exact (tiered): the whole cache; the reference rows.
- tiered sparse: runtime.Session(mode="sparse", budget_tokens=f * prompt, rounded down to pages), as
  benchmarks/bench_passkey.py runs it: the prompt is prefilled exactly, then at each decode step each
  KV head of each layer past the first `--dense-layers` reads sink + window + the top pages by
  importance (quest), within the budget.
- kvpress SnapKV, StreamingLLM, TOVA, Knorm, ExpectedAttention with compression_ratio = 1 - f:
  the press as a context manager around the prefill forward of the whole prompt (kvpress's README:
  `with press(model): model(input_ids, past_key_values=cache)`), then greedy decode on the pressed
  cache with position ids continuing the uncompressed positions (as kvpress's pipeline does).

Passkeys: `--keys` keys (runtime.passkey: depths spread over 0.05-0.95 of a ~1.9K-token haystack of
the shipped Shakespeare), greedy answer of `--answer-tokens` tokens; found when it contains the key.
Perplexity: `--heldout-tokens` tokens of the same text that follow a `--context-tokens` context
(taken after the haystack's part of the text); the context is prefilled (pressed, for kvpress), then
every held-out token is predicted from the compressed cache (kvpress: one forward of the held-out
tokens; tiered: one decode step per token, so each reads its sparse selection).
Prefill s: seconds of the prompt's prefill (kvpress: with the press's scoring and eviction; tiered
sparse: the exact prefill its sessions adopt from the store, plus their page summaries). Decode
tok/s: the answer's decode steps. Means over keys.

What is comparable and what is not:
- Equal fraction means equal KV *read per step and head*: kvpress keeps f of the prompt's tokens and
  drops the rest at prefill, for good; our sparse mode keeps every block (in lower tiers: host, disk)
  and picks the f it reads anew at each decode step, so a token it skipped once can be read later.
  The comparison is of answers under the same attention budget, not of memory: our rows hold the
  whole KV somewhere (here all tiers are this CPU's memory; StoreConfig's defaults).
- Our first `--dense-layers` layers (default 2 of 30, Session's default) read every token; kvpress
  compresses every layer. `--dense-layers 0` makes ours strict.
- Both see the question: it ends the prompt, so it is in SnapKV's observation window and TOVA's last
  query (kvpress's pipeline instead compresses the context alone and adds the question afterwards,
  query-agnostic). The first answer token comes from exact prefill logits in both.
- The two exact rows run different code on the same GGUF weights (transformers vs our decoder, fp32).
- Speeds are of a CPU run; on a loaded machine they are not a claim.

    python benchmarks/peers/bench_peers.py                               # 8 keys, 25% and 12.5%
    python benchmarks/peers/bench_peers.py --keys 20 --heldout-tokens 256 --json peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from importlib import resources

import torch
from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

from runtime import Session, load_model
from runtime.model.load import smollm2_135m
from runtime.passkey import passkey_prompt, passkeys
from tiered import StoreConfig, TieredStore

# name -> press class (each takes compression_ratio)
PRESSES = {
    "SnapKV": SnapKVPress,
    "StreamingLLM": StreamingLLMPress,
    "TOVA": TOVAPress,
    "Knorm": KnormPress,
    "ExpectedAttention": ExpectedAttentionPress,
}


class Row:
    """One method at one fraction: keys found, perplexity, timings."""

    def __init__(self, method: str, fraction: float | None) -> None:
        self.method, self.fraction = method, fraction
        self.found, self.keys, self.misses = 0, 0, []
        self.ppl: float | None = None
        self.prefill_s: list[float] = []
        self.decode_tok_s: list[float] = []

    def add_answer(self, key: str, depth: float, answer: str, prefill_s: float, decode_tok_s: float) -> None:
        self.keys += 1
        if key in answer:
            self.found += 1
        else:
            self.misses.append(f"{depth:.2f}:{answer.strip()[:10]!r}")
        self.prefill_s.append(prefill_s)
        self.decode_tok_s.append(decode_tok_s)

    def as_dict(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return dict(method=self.method, fraction=self.fraction, found=self.found, keys=self.keys, misses=self.misses,
                    perplexity=self.ppl, prefill_s=mean(self.prefill_s), decode_tok_s=mean(self.decode_tok_s))


# -- transformers (exact and kvpress) ---------------------------------------------------------------

@torch.no_grad()
def hf_answer(model, ids: list[int], press, answer_tokens: int) -> tuple[list[int], float, float]:
    """Greedy answer after prefilling `ids` (under `press` if given): tokens, prefill s, decode tok/s."""
    cache = DynamicCache()
    prompt = torch.tensor([ids])  # [1, prompt]
    start_s = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(prompt, past_key_values=cache, logits_to_keep=1).logits[0, -1]  # [vocab]
    prefill_s = time.perf_counter() - start_s
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    tokens = [int(logits.argmax())]
    start_s, steps = time.perf_counter(), 0
    while len(tokens) < answer_tokens and tokens[-1] not in stops:
        position = torch.tensor([[len(ids) + steps]])  # the uncompressed position, as kvpress's pipeline keeps
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=position).logits[0, -1]
        tokens.append(int(logits.argmax()))
        steps += 1
    decode_s = time.perf_counter() - start_s
    return [t for t in tokens if t not in stops], prefill_s, steps / decode_s if steps else float("nan")


@torch.no_grad()
def hf_perplexity(model, context: list[int], heldout: list[int], press) -> float:
    """exp(mean NLL) of `heldout` after `context` prefilled under `press` (the held-out tokens are not pressed)."""
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        first = model(torch.tensor([context]), past_key_values=cache, logits_to_keep=1).logits[0, -1:]  # [1, vocab]
    positions = torch.arange(len(context), len(context) + len(heldout) - 1).unsqueeze(0)  # [1, heldout - 1]
    rest = model(torch.tensor([heldout[:-1]]), past_key_values=cache, position_ids=positions).logits[0]
    logits = torch.cat([first, rest]).float()  # [heldout, vocab]: row i predicts heldout[i]
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(heldout)).item())


# -- ours (runtime.Session) --------------------------------------------------------------------------

def sparse_options(args, tokens: int, fraction: float) -> dict:
    budget = int(tokens * fraction) // args.page_tokens * args.page_tokens
    return dict(mode="sparse", budget_tokens=budget, importance=args.importance, dense_layers=args.dense_layers,
                page_tokens=args.page_tokens)


def tiered_answers(model, args, ids: list[int], key: str, depth: float, rows: dict) -> None:
    """One store holds the prompt: the exact session computes it, each sparse session adopts its blocks."""
    with TieredStore(StoreConfig(device="cpu", layers=model.config.num_layers, fingerprint=model.fingerprint)) as store:
        exact_prefill_s = None
        for fraction in [None, *args.fractions]:
            options = {} if fraction is None else sparse_options(args, len(ids), fraction)
            with Session(model, store=store, **options) as session:
                start_s = time.perf_counter()
                session.extend(ids)
                prefill_s = time.perf_counter() - start_s
                if fraction is None:
                    exact_prefill_s = prefill_s
                else:
                    assert session.stats()["reused_tokens"] > len(ids) - 64, "the sparse session did not adopt the prompt"
                start_s = time.perf_counter()
                answer = session.generate(args.answer_tokens)
                decode_s = time.perf_counter() - start_s
            # a sparse session's prefill is the exact one it adopts plus its own adoption
            total_s = prefill_s if fraction is None else exact_prefill_s + prefill_s
            name = "tiered exact" if fraction is None else f"tiered sparse ({args.importance})"
            rows[name, fraction].add_answer(key, depth, model.tokenizer.decode(answer), total_s,
                                            len(answer) / decode_s if answer else float("nan"))


def tiered_perplexity(model, args, context: list[int], heldout: list[int], fraction: float | None) -> float:
    """Its own store (held-out blocks are content-addressed: sessions of one store would share them)."""
    options = {} if fraction is None else sparse_options(args, len(context), fraction)
    with TieredStore(StoreConfig(device="cpu", layers=model.config.num_layers, fingerprint=model.fingerprint)) as store:
        with Session(model, store=store, **options) as session:
            rows = [session.extend(context)[-1]]  # [vocab]
            for token in heldout[:-1]:  # one decode step each: sparse steps read their selection
                rows.append(session.extend([token])[-1])
    logits = torch.stack(rows).float()  # [heldout, vocab]
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(heldout)).item())


# -- the run -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--fractions", default="0.25,0.125", help="KV fractions of the prompt, comma-separated")
    parser.add_argument("--presses", default=",".join(PRESSES), help=f"comma-separated, of {list(PRESSES)}")
    parser.add_argument("--importance", default="quest")
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=7)
    parser.add_argument("--context-tokens", type=int, default=1900)
    parser.add_argument("--heldout-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    args.fractions = [float(f) for f in args.fractions.split(",")]
    presses = [name for name in args.presses.split(",") if name]
    unknown = sorted(set(presses) - set(PRESSES))
    if unknown:
        parser.error(f"unknown presses {unknown}; valid: {list(PRESSES)}")
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    start_s = time.perf_counter()

    ours = load_model()
    path = smollm2_135m()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows: dict = {("transformers exact", None): Row("transformers exact", None),
                  ("tiered exact", None): Row("tiered exact", None)}
    for fraction in args.fractions:
        rows[f"tiered sparse ({args.importance})", fraction] = Row(f"tiered sparse ({args.importance})", fraction)
        for name in presses:
            rows[f"kvpress {name}", fraction] = Row(f"kvpress {name}", fraction)

    for index, (key, depth) in enumerate(passkeys(args.keys)):
        ids = passkey_prompt(ours.tokenizer, key, depth)
        tiered_answers(ours, args, ids, key, depth, rows)
        runs = [("transformers exact", None, None)] + [
            (f"kvpress {name}", fraction, PRESSES[name](compression_ratio=1 - fraction))
            for fraction in args.fractions for name in presses]
        for method, fraction, press in runs:
            tokens, prefill_s, tok_s = hf_answer(hf, ids, press, args.answer_tokens)
            rows[method, fraction].add_answer(key, depth, ours.tokenizer.decode(tokens), prefill_s, tok_s)
        print(f"key {index + 1}/{args.keys} (depth {depth:.2f}, {len(ids)} tokens): "
              f"{time.perf_counter() - start_s:.0f} s", flush=True)

    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    offset = 2048  # past the ~1.8K tokens the passkey haystack uses
    needed = offset + args.context_tokens + args.heldout_tokens
    all_ids = ours.tokenizer.encode(text[: needed * 6])[:needed]
    context, heldout = all_ids[offset: offset + args.context_tokens], all_ids[offset + args.context_tokens:]
    for (method, fraction), row in rows.items():
        if method.startswith("tiered"):
            row.ppl = tiered_perplexity(ours, args, context, heldout, fraction)
        else:
            press = None if fraction is None else PRESSES[method.removeprefix("kvpress ")](compression_ratio=1 - fraction)
            row.ppl = hf_perplexity(hf, context, heldout, press)
    elapsed_s = time.perf_counter() - start_s

    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}"
    table = Table(title=f"SmolLM2-135M: passkeys of {args.keys} and perplexity of {len(heldout)} held-out tokens "
                        f"after {len(context)} (dense_layers={args.dense_layers} for tiered sparse)")
    for column in ("method", "fraction", "passkeys found", "perplexity", "prefill s", "decode tok/s", "misses (depth:answer)"):
        table.add_column(column)
    results = [row.as_dict() for row in rows.values()]
    for r in results:
        table.add_row(r["method"], "100%" if r["fraction"] is None else f"{r['fraction']:.1%}", f"{r['found']}/{r['keys']}",
                      f"{r['perplexity']:.3f}", f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}", " ".join(r["misses"]))
    Console(width=200).print(table)
    print(f"{machine}, {elapsed_s:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "json"}, machine=machine,
                           elapsed_s=elapsed_s, rows=results), file, indent=2)


if __name__ == "__main__":
    main()
