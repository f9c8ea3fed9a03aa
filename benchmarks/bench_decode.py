"""Decode tokens/s of the default model at long contexts: ours (several tier set-ups) and
transformers' DynamicCache, same weights, same prompt, same process; plus sparse perplexity.

For each context length, the prompt is prefilled once with our model into a plain cache; every
set-up then starts from those same keys and values (the prefill itself is not timed) and decodes
the same greedy continuation. Set-ups:

    device     ours, every block on the device tier (exact)
    hf         transformers LlamaForCausalLM with DynamicCache, loaded from the same GGUF
    tiered25   ours exact, 25% of the KV on the device tier, the rest in the host tier (int8)
    tiered10   ours exact, 10% of the KV's blocks on the device, 20% in the host tier (int8), the
               other 70% in the disk tier (int8, a fresh temporary directory whose files are in
               the page cache, as just written)
    sparse12   ours sparse, quest, a budget of 12.5% of the context, 16-token pages (Quest's) in the
               store's default 64-token blocks, every block on the device
    sparse12low  sparse12 with 25% of the KV on the device and the rest in the host tier (int8),
               `next-layer` prefetch (or --low-prefetch) bringing the next layer's chosen blocks
               up; prints the stall (reads waiting for a move, plus decoding host blocks in the
               step) as a share of the decode time, and the prefetch precision (moved blocks read
               before they left)

The memory-bandwidth floor of a decode step is (bytes of weights + bytes of KV read per token)
divided by the bandwidth of a large tensor.copy_ measured in the same run.

Perplexity: on a held-out stretch of the document, after a dense prefill of the context before
it, each token is decoded one at a time with sparse attention at a 25% budget, and with exact.

    python benchmarks/bench_decode.py                      # 1K, 4K, 8K
    python benchmarks/bench_decode.py --lengths 1024 --steps 8 --ppl-tokens 64
    python benchmarks/bench_decode.py --lengths 4096 --runs 3 --setups device tiered25 --ppl-tokens 0

With --runs N each set-up is timed N times (fresh session each time) and the median is printed with
the range; --ppl-tokens 0 skips the perplexity part.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from importlib import resources

import torch

from runtime import Session, load_model
from runtime.model import DenseKV
from runtime.model.load import smollm2_135m
from tiered import CODECS, StoreConfig, make_codec

BLOCK_TOKENS = 64
SPARSE_BLOCK_TOKENS = 16  # Quest's page size: its key bounds stay tight enough to rank blocks


def copy_bandwidth_bytes_per_s() -> float:
    source = torch.empty(64 << 20, dtype=torch.uint8).random_()  # 64 MiB
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    return 10 * source.numel() / (time.perf_counter() - start)


def document_ids(model, tokens: int, offset_chars: int = 0) -> list[int]:
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text[offset_chars : offset_chars + tokens * 6])
    assert len(ids) >= tokens, "the document is too short for this context"
    return ids[:tokens]


def prefill(model, ids: list[int], chunk: int = 512) -> tuple[DenseKV, torch.Tensor]:
    cache = DenseKV.for_model(model, capacity_tokens=len(ids) + 64)
    for i in range(0, len(ids), chunk):
        logits = model.forward(torch.tensor(ids[i : i + chunk]), torch.arange(i, min(i + chunk, len(ids))), cache)
    return cache, logits[-1]


def fill_session(session: Session, cache: DenseKV, ids: list[int], last_logits: torch.Tensor) -> None:
    """Load a prefilled cache into a session's store, as if the session had read `ids`."""
    kv = session.kv
    for layer in range(kv.layers):
        keys, values = cache.keys(layer), cache.values(layer)  # each [kv_heads, tokens, head_dim]
        kv.append(layer, keys, values)
    session.tokens = list(ids)
    session._last_logits = last_logits


def time_ours(model, cache, ids, last_logits, steps: int, config: StoreConfig, **options) -> tuple[float, list[int], dict]:
    """Decode tokens/s, the tokens, and the store's stall over the timed steps: stall_share (reads
    waiting for moves plus lower tiers' decoding, over the elapsed time) and prefetch precision."""
    with Session(model, config, **options) as session:
        fill_session(session, cache, ids, last_logits)
        session.generate(2, stop=[])  # warm up
        before = session.store.stats()
        start = time.perf_counter()
        tokens = session.generate(steps, stop=[])
        elapsed = time.perf_counter() - start
        after = session.store.stats()
        stall_s = after["stall_s"] - before["stall_s"] + sum(
            after["tiers"][name]["read_s"] - before["tiers"][name]["read_s"] for name in after["tiers"] if name != "device")
        moved = after["prefetch"]["moved_blocks"] - before["prefetch"]["moved_blocks"]
        used = after["prefetch"]["used_blocks"] - before["prefetch"]["used_blocks"]
        return steps / elapsed, tokens, dict(store=after, stall_share=stall_s / elapsed,
                                             precision=used / moved if moved else None, moved=moved)


def time_transformers(hf, cache, ids, last_logits, steps: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    past = DynamicCache()
    for layer in range(cache.num_layers):  # the same keys and values, in transformers' [batch, heads, tokens, dim]
        past.update(cache.keys(layer)[None].clone(), cache.values(layer)[None].clone(), layer)
    token, position = int(last_logits.argmax()), len(ids)
    tokens = []  # the tokens fed, as Session.generate yields them
    with torch.inference_mode():
        for step in range(steps + 2):
            if step == 2:  # the first two steps warm up, as for ours
                start = time.perf_counter()
            tokens.append(token)
            out = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True,
                     position_ids=torch.tensor([[position]]))
            token, position = int(out.logits[0, -1].argmax()), position + 1
    return steps / (time.perf_counter() - start), tokens[2:]


def kv_bytes(model, tokens: int) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * tokens * model.dtype.itemsize


def tier_shares(store_stats: dict) -> str:
    """Where the blocks are, e.g. "device 25%, host 75%" (a block written through to disk counts
    where it is read from: the disk only when no tier above holds it)."""
    tiers = store_stats["tiers"]
    counts = {name: tiers[name]["blocks"] for name in tiers if name != "disk"}
    if "disk" in tiers:
        counts["disk"] = store_stats["blocks"] - sum(counts.values())
    total = store_stats["blocks"]
    return ", ".join(f"{name} {count / total:.0%}" for name, count in counts.items() if count)


def encoded_share(model, codec: str) -> float:
    """Bytes of a full block in `codec` over its bytes in the model's dtype (a host tier of
    share · x bytes holds the blocks that fill x bytes on the device)."""
    cfg = model.config
    raw = 2 * cfg.num_kv_heads * BLOCK_TOKENS * cfg.head_dim * model.dtype.itemsize
    return make_codec(codec).encoded_nbytes(cfg.num_kv_heads, BLOCK_TOKENS, cfg.head_dim, model.dtype) / raw


def weight_bytes(model) -> int:
    total = sum(t.numel() * t.element_size() for layer in model.layers for t in vars(layer).values() if t is not None)
    return total + model.lm_head.numel() * model.lm_head.element_size() + model.final_norm.numel() * 4


def store_config(
    model, device_bytes: int, host_bytes: int, host_codec: str, block_tokens: int = BLOCK_TOKENS
) -> StoreConfig:
    return StoreConfig(device="cpu", device_bytes=device_bytes, host_bytes=host_bytes, block_tokens=block_tokens,
                       host_codec=host_codec)


def perplexity(model, context: list[int], held_out: list[int], block_tokens: int = BLOCK_TOKENS, **options) -> float:
    total = len(context) + len(held_out)
    config = store_config(model, 2 * kv_bytes(model, total) + (64 << 20), 64 << 20, "raw", block_tokens)
    with Session(model, config, **options) as session:
        for i in range(0, len(context), 512):
            logits = session.extend(context[i : i + 512])
        nll = 0.0
        for token in held_out:
            nll -= torch.log_softmax(logits[-1].float(), -1)[token].item()
            logits = session.extend([token])
    return math.exp(nll / len(held_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--ppl-context", type=int, default=2048)
    parser.add_argument("--ppl-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1, help="timings per set-up; the median is printed")
    parser.add_argument("--low-prefetch", default="next-layer", help="the prefetch policy of sparse12low")
    parser.add_argument("--setups", nargs="+", default=["device", "tiered25", "tiered10", "sparse12", "sparse12low"],
                        choices=["device", "tiered25", "tiered10", "sparse12", "sparse12low"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = load_model()
    path = smollm2_135m()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    codec = "int8" if "int8" in CODECS else "raw"
    bandwidth = copy_bandwidth_bytes_per_s()
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"copy_ {bandwidth / 1e9:.2f} GB/s; weights {weight_bytes(model) / 2**20:.0f} MiB fp32")
    print(f"{'context':>7} {'set-up':>9} {'tok/s':>7} {'vs hf':>6} {'floor tok/s':>11} {'of floor':>8}  same tokens")
    for length in args.lengths:
        ids = document_ids(model, length - args.steps - 4)
        cache, last_logits = prefill(model, ids)
        floor = bandwidth / (weight_bytes(model) + kv_bytes(model, length))
        hf_rate, hf_tokens = time_transformers(hf, cache, ids, last_logits, args.steps)
        kv_total = kv_bytes(model, length + 64 * model.config.num_layers)  # room to spare
        kv_context = kv_bytes(model, length)  # the shares of the KV on each tier are of this
        sparse = dict(mode="sparse", budget_tokens=length // 8, importance="quest")
        setups = {
            "device": (store_config(model, 2 * kv_total, 64 << 20, "raw"), {}),
            "tiered25": (store_config(model, kv_context // 4, kv_total, codec), {}),
            "tiered10": (replace(store_config(model, kv_context // 10, int(kv_context * encoded_share(model, codec)) // 5,
                                              codec), disk_bytes=2 * kv_total, disk_codec=codec), {}),
            "sparse12": (store_config(model, 2 * kv_total, 64 << 20, "raw"), sparse),
            "sparse12low": (store_config(model, kv_context // 4, kv_total, codec), dict(sparse, prefetch=args.low_prefetch)),
        }
        print(f"{length:>7} {'hf':>9} {hf_rate:>7.2f} {1.0:>6.2f} {floor:>11.2f} {hf_rate / floor:>8.2f}")
        rates: dict[str, list[float]] = {}
        for run in range(args.runs):  # set-ups interleaved, so a change of load hits each alike
            for name in args.setups:
                config, options = setups[name]
                disk_dir = tempfile.mkdtemp(prefix="bench-decode-") if name == "tiered10" else None
                try:
                    rate, tokens, stats = time_ours(model, cache, ids, last_logits, args.steps,
                                                    replace(config, disk_dir=disk_dir), **options)
                finally:
                    if disk_dir is not None:
                        shutil.rmtree(disk_dir)
                rates.setdefault(name, []).append(rate)
                same = sum(a == b for a, b in zip(tokens, hf_tokens))
                print(f"{length:>7} {name:>9} {rate:>7.2f} {rate / hf_rate:>6.2f} {floor:>11.2f} {rate / floor:>8.2f}  "
                      f"{same}/{args.steps}" + (f"  ({tier_shares(stats['store'])} of the blocks)" if name != "device" else "")
                      + (f"  stall {stats['stall_share']:.1%} of the time, prefetch precision "
                         + (f"{stats['precision']:.2f} of {stats['moved']} moved" if stats["moved"] else "- (none moved)")
                         if name == "sparse12low" else "")
                      + (f"  run {run + 1}" if args.runs > 1 else ""))
        if args.runs > 1:
            for name, values in rates.items():
                print(f"{length:>7} {name:>9} median {statistics.median(values):.2f} tok/s, "
                      f"range {min(values):.2f}-{max(values):.2f} over {len(values)} runs")
            for name in ("tiered25", "tiered10", "sparse12", "sparse12low"):
                if "device" in rates and name in rates:
                    ratios = [t / d for t, d in zip(rates[name], rates["device"])]
                    print(f"{length:>7} {name}/device median {statistics.median(ratios):.2f}x, "
                          f"range {min(ratios):.2f}-{max(ratios):.2f}")
        del cache
    if args.ppl_tokens <= 0:
        return
    context = document_ids(model, args.ppl_context + args.ppl_tokens, offset_chars=400_000)
    exact = perplexity(model, context[: args.ppl_context], context[args.ppl_context :])
    print(f"perplexity over {args.ppl_tokens} held-out tokens after {args.ppl_context}: exact {exact:.3f}")
    for block_tokens in (SPARSE_BLOCK_TOKENS, BLOCK_TOKENS):
        sparse = perplexity(model, context[: args.ppl_context], context[args.ppl_context :], block_tokens,
                            mode="sparse", budget_tokens=args.ppl_context // 4, importance="quest")
        print(f"  sparse 25% quest, {block_tokens}-token blocks: {sparse:.3f} ({(sparse / exact - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
