"""transformers caches side by side on SmolLM2-135M: DynamicCache, DynamicCache(offloading=True),
QuantizedCache (quanto / HQQ int4, where they install) and TieredCache (25% of the KV on the device,
the rest in an int8 host tier; with transformers' SDPA, which gets the history as tensors, and with the
"tiered" attention, whose decode steps read the blocks where they lie; and sparse, each KV head reading
an eighth of each layer), at each context length, in one run.

For each cache and context: decode tok/s (teacher-forced decode of DynamicCache's own greedy
continuation, one token a step; median and range of --runs runs, the caches taking turns), peak
resident KV bytes per tier, greedy agreement with DynamicCache over those steps (does the cache's
argmax equal DynamicCache's token?), and perplexity of the held-out tokens that follow the context
in the text (one forward of them after the prefill; for the sparse cache one decode step per token,
since sparse reads are decode steps).

    python benchmarks/bench_hf.py [--contexts 4096 8192] [--decode-tokens 256] [--heldout-tokens 256] [--threads N]
    make bench-hf   # installs quanto and HQQ (the quant extra) first
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from importlib import resources
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache

from runtime import load_model
from runtime.hf import ATTENTION, TieredCache
from runtime.model.load import smollm2_135m
from tiered import StoreConfig

BLOCK_TOKENS = 64
DEVICE_FRACTION = 0.25


def kv_nbytes_per_token(config) -> int:
    """Keys + values of one token over all layers, in the model's dtype (fp32 here)."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * 4 * config.num_hidden_layers


def tiered_cache(config, tokens: int, sparse: dict | None = None) -> TieredCache:
    """25% of `tokens` tokens' KV on the device (rounded down to whole blocks per layer), the rest int8 on the host."""
    block_nbytes = kv_nbytes_per_token(config) // config.num_hidden_layers * BLOCK_TOKENS
    blocks = config.num_hidden_layers * -(-tokens // BLOCK_TOKENS)
    device_blocks = int(blocks * DEVICE_FRACTION)
    store = StoreConfig(device="cuda" if torch.cuda.is_available() else "cpu", device_bytes=device_blocks * block_nbytes,
                        host_bytes=2 * blocks * block_nbytes, host_codec="int8", block_tokens=BLOCK_TOKENS)
    return TieredCache(store, config=config, sparse=sparse)


class Candidate(NamedTuple):
    make: Callable  # a fresh cache; one that cannot run here raises when made or used
    attention: str = "sdpa"  # the model's attention implementation for it
    stepwise: bool = False  # perplexity from one decode step per held-out token (sparse steps are decode steps)


def candidates(config, tokens: int) -> dict[str, Candidate]:
    budget = tokens // 8
    return {
        "DynamicCache": Candidate(lambda: DynamicCache(config=config)),
        "DynamicCache(offloading=True)": Candidate(lambda: DynamicCache(config=config, offloading=True)),
        "QuantizedCache quanto int4": Candidate(lambda: QuantizedCache("quanto", config, nbits=4)),
        "QuantizedCache HQQ int4": Candidate(lambda: QuantizedCache("hqq", config, nbits=4, axis_key=1, axis_value=1)),
        "TieredCache 25% device + int8 host, sdpa": Candidate(lambda: tiered_cache(config, tokens)),
        # decode steps read the blocks where they lie (runtime.hf.attention)
        "TieredCache 25% device + int8 host, tiered attention": Candidate(lambda: tiered_cache(config, tokens), ATTENTION),
        # each KV head reads an eighth of each layer: sinks, recent window and Quest's top pages
        "TieredCache 25% device + int8 host, sparse 12.5%": Candidate(
            lambda: tiered_cache(config, tokens, sparse={"budget_tokens": budget}), ATTENTION, stepwise=True),
    }


def resident_kv_bytes(cache) -> dict[str, int]:
    """Bytes of KV each tier holds now: the store's tiers for TieredCache, tensors by device otherwise."""
    if isinstance(cache, TieredCache):
        return {name: tier["used_bytes"] for name, tier in cache.store.stats()["tiers"].items()}
    totals: dict[str, int] = {}
    for layer in cache.layers:
        for tensor in _layer_tensors(layer):
            place = "device" if tensor.device.type != "cpu" or not torch.cuda.is_available() else "host"
            totals[place] = totals.get(place, 0) + tensor.numel() * tensor.element_size()
    return totals


def _layer_tensors(layer) -> list[torch.Tensor]:
    found = [t for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    for name in ("_quantized_keys", "_quantized_values"):
        found.extend(_plain_tensors(getattr(layer, name, None)))
    return found


def _plain_tensors(packed) -> list[torch.Tensor]:
    """The plain tensors holding a backend's quantized state: a tensor subclass (quanto's QTensor) by
    the inner tensors it flattens to, a container (HQQ's codes and meta dict) by its items."""
    if isinstance(packed, torch.Tensor):
        if type(packed) is not torch.Tensor and hasattr(packed, "__tensor_flatten__"):
            names, _ = packed.__tensor_flatten__()
            return [t for n in names for t in _plain_tensors(getattr(packed, n))]
        return [packed]
    if isinstance(packed, dict):
        return [t for v in packed.values() for t in _plain_tensors(v)]
    if isinstance(packed, (list, tuple)):
        return [t for v in packed for t in _plain_tensors(v)]
    return []


@torch.no_grad()
def perplexity(model, make_cache, context: torch.Tensor, heldout: torch.Tensor, stepwise: bool) -> tuple[float, dict]:
    """Perplexity of `heldout` after `context` (one forward of it, or with `stepwise` one decode step per
    token), and the KV bytes each tier then holds."""
    cache = make_cache()
    model(context, cache=cache)
    if stepwise:
        logits = torch.cat([model(heldout[:, i : i + 1], cache=cache).logits[0] for i in range(heldout.shape[1] - 1)])
    else:
        logits = model(heldout[:, :-1], cache=cache).logits[0]  # [heldout - 1, vocab]
    nll = torch.nn.functional.cross_entropy(logits.float(), heldout[0, 1:])
    held = resident_kv_bytes(cache)
    if hasattr(cache, "close"):
        cache.close()
    return math.exp(nll.item()), held


@torch.no_grad()
def decode(model, make_cache, context: torch.Tensor, forced: torch.Tensor) -> tuple[float, float, dict]:
    """Teacher-forced decode of `forced` after `context`: (tok/s, greedy agreement with `forced`, KV
    bytes each tier holds at the end)."""
    cache = make_cache()
    logits = model(context, cache=cache).logits[:, -1]
    agree = 0
    start_s = time.perf_counter()
    for token in forced[0]:
        agree += int(logits.argmax(-1).item() == token.item())
        logits = model(token.view(1, 1), cache=cache).logits[:, -1]
    elapsed_s = time.perf_counter() - start_s
    held = resident_kv_bytes(cache)
    if hasattr(cache, "close"):
        cache.close()
    return forced.shape[1] / elapsed_s, agree / forced.shape[1], held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--heldout-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=3, help="decode runs per cache (median and range of tok/s)")
    parser.add_argument("--caches", nargs="+", default=None,
                        help="only the caches whose names contain one of these (DynamicCache, the baseline, always runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_135m()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).to(device).eval()
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    needed = max(args.contexts) + args.heldout_tokens
    ids = load_model("smollm2-135m").tokenizer.encode(text[: needed * 6])[:needed]
    all_ids = torch.tensor([ids], device=device)  # [1, needed]
    table = Table("context", "cache", "tok/s (median, range)", "x DynamicCache", "device KV MiB", "host KV MiB",
                  "agreement", "perplexity",
                  title=f"SmolLM2-135M fp32 on {device}, torch {torch.__version__}, {args.threads} threads, "
                        f"{args.decode_tokens} decode steps, {args.heldout_tokens} held-out tokens")
    for tokens in args.contexts:
        context, heldout = all_ids[:, :tokens], all_ids[:, tokens : tokens + args.heldout_tokens]
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            greedy = model.generate(context, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                                    do_sample=False, cache=DynamicCache(config=model.config))
        forced = greedy[:, tokens:]  # [1, decode_tokens]: DynamicCache's greedy continuation
        speeds: dict[str, list[float]] = {}
        results: dict[str, dict] = {}
        for run in range(args.runs):  # the caches take turns, so drift on the machine reaches them all
            for name, candidate in candidates(model.config, tokens + args.decode_tokens).items():
                skipped = args.caches and name != "DynamicCache" and not any(c in name for c in args.caches)
                if skipped or results.get(name, {}).get("error"):
                    continue
                model.set_attn_implementation(candidate.attention)
                try:
                    tok_s, agreement, held = decode(model, candidate.make, context, forced)
                    if run == 0:
                        ppl, held_ppl = perplexity(model, candidate.make, context, heldout, candidate.stepwise)
                        peak = {p: max(held.get(p, 0), held_ppl.get(p, 0)) for p in {*held, *held_ppl}}
                        results[name] = {"agreement": agreement, "ppl": ppl, "kv": peak}
                except Exception as error:  # a backend that is not installed or does not run on this device
                    results[name] = {"error": f"does not run here: {type(error).__name__}: {str(error)[:80]}"}
                    continue
                speeds.setdefault(name, []).append(tok_s)
                print(f"{tokens} {name} run {run + 1}: {tok_s:.2f} tok/s", flush=True)
        base = statistics.median(speeds["DynamicCache"])
        for name, result in results.items():
            if "error" in result:
                table.add_row(str(tokens), name, result["error"])
                continue
            median = statistics.median(speeds[name])
            device_mib = result["kv"].get("device", 0) / 2**20
            host_mib = sum(v for k, v in result["kv"].items() if k != "device") / 2**20
            table.add_row(str(tokens), name, f"{median:.2f} ({min(speeds[name]):.2f}-{max(speeds[name]):.2f})",
                          f"{median / base:.2f}", f"{device_mib:.1f}", f"{host_mib:.1f}", f"{result['agreement']:.1%}",
                          f"{result['ppl']:.3f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
