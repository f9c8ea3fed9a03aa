"""Decode tokens/s of our decoder (DenseKV, a plain full cache) against transformers' LlamaForCausalLM
with a DynamicCache, on the same SmolLM2-135M GGUF weights, in one process, plus the memory-bandwidth
floor: bytes read per token (weights + KV) / measured bandwidth.

Rounds alternate ours, transformers and the bandwidth probes; each round prefills the same prompt and
decodes the same greedy continuation; every figure is its best round (the least disturbed by other load).

    python benchmarks/bench_model.py                  # 128-token context, 32 decoded tokens, 5 rounds
    python benchmarks/bench_model.py --context 1024 --rounds 3 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import time
from importlib import resources

import torch

from runtime import load_model
from runtime.model import DenseKV
from runtime.model.load import smollm2_135m


def bandwidths_gb_s(size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """GB/s over a buffer larger than the caches: bytes copied per second by Tensor.copy_, and bytes
    read per second by a sum and by a matrix-vector product (the access pattern of decode)."""
    source = torch.ones(size_bytes // 4)
    target = torch.empty_like(source)
    matrix, vector = source.view(-1, 4096), torch.ones(1, 4096)  # [rows, 4096], [1, 4096]
    runs = {"copy": lambda: target.copy_(source), "sum": source.sum,
            "gemv": lambda: torch.nn.functional.linear(vector, matrix)}
    best = {}
    for name, run in runs.items():
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds = min(seconds, time.perf_counter() - start)
        best[name] = size_bytes / seconds / 1e9
    return best


def bytes_per_token(model, context_tokens: int) -> int:
    """Weights a decode step reads (every matrix, norm and the lm_head once) plus the KV it attends over."""
    weights = sum(t.numel() * t.element_size() for layer in model.layers for t in vars(layer).values() if t is not None)
    weights += model.lm_head.numel() * model.lm_head.element_size() + model.final_norm.numel() * model.final_norm.element_size()
    cfg = model.config
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context_tokens * model.lm_head.element_size()
    return weights + kv


def ours_round(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds per decoded token, and the tokens."""
    kv = DenseKV.for_model(model, capacity_tokens=len(prompt) + new_tokens)
    logits = model.forward(prompt, torch.arange(len(prompt)), kv)
    tokens, position = [], len(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(logits[-1].argmax())
        tokens.append(token)
        logits = model.forward(torch.tensor([token]), torch.tensor([position]), kv)
        position += 1
    return (time.perf_counter() - start) / new_tokens, tokens


@torch.inference_mode()
def transformers_round(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(prompt[None], past_key_values=cache, use_cache=True).logits[0]
    tokens, position = [], len(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(logits[-1].argmax())
        tokens.append(token)
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[position]])).logits[0]
        position += 1
    return (time.perf_counter() - start) / new_tokens, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    ours = load_model("smollm2-135m", dtype=dtype)
    path = smollm2_135m()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    prompt = torch.tensor(ours.tokenizer.encode(text[: args.context * 8])[: args.context])

    ours_s = theirs_s = float("inf")
    bandwidth: dict[str, float] = {}
    for _ in range(args.rounds):  # bandwidth too is the best of the rounds, measured between them
        seconds, ours_tokens = ours_round(ours, prompt, args.new_tokens)
        ours_s = min(ours_s, seconds)
        seconds, their_tokens = transformers_round(theirs, prompt, args.new_tokens)
        theirs_s = min(theirs_s, seconds)
        for name, gb_s in bandwidths_gb_s(repeats=2).items():
            bandwidth[name] = max(bandwidth.get(name, 0.0), gb_s)
    read_bytes = bytes_per_token(ours, args.context + args.new_tokens // 2)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, context {args.context}, {args.new_tokens} decoded tokens, best of {args.rounds} rounds")
    print(f"same greedy tokens: {ours_tokens == their_tokens}")
    print(f"bytes read per token: {read_bytes / 1e6:.1f} MB; bandwidth over 1 GiB (GB/s): "
          + ", ".join(f"{name} {gb_s:.1f}" for name, gb_s in bandwidth.items()))
    print(f"{'engine':<34} {'tokens/s':>9} {'ms/token':>9} {'vs transformers':>16}")
    print(f"{'transformers LlamaForCausalLM':<34} {1 / theirs_s:9.1f} {theirs_s * 1e3:9.1f} {1.0:16.2f}")
    print(f"{'ours (DenseKV)':<34} {1 / ours_s:9.1f} {ours_s * 1e3:9.1f} {theirs_s / ours_s:16.2f}")
    name, gb_s = max(bandwidth.items(), key=lambda item: item[1])
    floor_s = read_bytes / (gb_s * 1e9)
    print(f"{'floor at ' + name + ' bandwidth':<34} {1 / floor_s:9.1f} {floor_s * 1e3:9.1f} {theirs_s / floor_s:16.2f}")
    print(f"ours / floor time: {ours_s / floor_s:.2f} (goal <= 1.2; below 1 means the weights partly sit in cache)")


if __name__ == "__main__":
    main()
