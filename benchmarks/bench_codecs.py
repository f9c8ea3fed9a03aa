"""Encode and decode throughput of every codec, next to tensor.copy_ of the same tensors, in one run.

GB/s count the blocks' 16-bit input bytes (fp16 keys + values) per second, for encode (block ->
payload) and decode (payload -> block). Each codec's row measures copy_ of the same source
tensors right before it (best of the same number of repeats), and the ratio is codec / copy_:
  - "1 block": one 64-token block at a time, encode_into a preallocated payload (what the store
    does when it spills a block into a host slot) and decode; copy_ of its keys and values.
  - "N blocks": encode_many_into preallocated payloads (what the store does when it spills many
    blocks into host slots, TieredStore's demote_many) / decode_many of N blocks that are views
    of one [N, heads, 64, dim] tensor (the batched API; one kernel call); copy_ of those two whole
    tensors. "encode_many" is the same encode into new payloads, so its ratio counts allocating them.
Shapes: 3 KV heads x 64 dims (SmolLM2-135M) and 8 x 128. "saved" is 1 - payload / input bytes.
Rows marked "reference" run the eager-torch reference kernels (the definition of the codes).

With CUDA, a second section: device encode/decode of int4 against device copy_, and device ->
host transfer of N blocks, fp16 against int4 (encoded on the device, payloads copied), in blocks/s.

    python benchmarks/bench_codecs.py              # full run
    python benchmarks/bench_codecs.py --quick      # fewer repeats
    python benchmarks/bench_codecs.py --threads 1  # one core: copy_ and the codecs alike
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from tiered import CODECS, KVBlock, make_codec
from tiered.codecs import cpu_kernels, reference, triton_kernels

TOKENS = 64
SHAPES = [(3, 64), (8, 128)]  # (kv_heads, head_dim)
BATCH_BYTES = 16 << 20  # fp16 input bytes of a batch


def best_s(fn, repeats: int, min_s: float = 0.02) -> float:
    """Seconds per call of fn: the best of `repeats` timed loops of at least min_s each."""
    fn()
    calls = 1
    while True:  # calls per loop
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= min_s or calls >= 1 << 16:
            break
        calls *= 4
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - start) / calls)
    return min(results)


def make_batch(count: int, kv_heads: int, head_dim: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values: [count, kv_heads, TOKENS, head_dim] fp16; keys with outlier channels."""
    generator = torch.Generator().manual_seed(0)
    shape = (count, kv_heads, TOKENS, head_dim)
    channel_scale = 1 + 20 * (torch.rand(head_dim, generator=generator) > 0.95)
    keys = (torch.randn(shape, generator=generator) * channel_scale).half()
    values = torch.randn(shape, generator=generator).half()
    return keys.to(device), values.to(device)


def cpu_table(kv_heads: int, head_dim: int, count: int, repeats: int, n: int) -> Table:
    """The rows of one shape, one block at a time (n = 1) or `count` at once."""
    keys, values = make_batch(count, kv_heads, head_dim)
    blocks = [KVBlock(k, v) for k, v in zip(keys, values)]
    input_bytes = 2 * keys.numel() * 2
    keys_out, values_out = torch.empty_like(keys), torch.empty_like(values)
    one = blocks[0]
    one_keys, one_values = torch.empty_like(one.keys), torch.empty_like(one.values)

    def copy_all():
        keys_out.copy_(keys)
        values_out.copy_(values)

    def copy_one():
        one_keys.copy_(one.keys)
        one_values.copy_(one.values)

    label = "1 block" if n == 1 else f"{count} blocks"
    table = Table("codec", "bytes/block", "saved", "copy_ GB/s", "encode GB/s", "ratio", "decode GB/s", "ratio",
                  "encode_many ratio", title=f"{kv_heads}x{TOKENS}x{head_dim} fp16, {label} ({n * one.nbytes / 1024:.0f} KiB)")
    for name in [*sorted(CODECS), "int8 reference", "int4 reference"]:
        codec = make_codec(name.split()[0])
        is_reference = name.endswith("reference")
        allocating_s = None  # encode_many's seconds (new payloads), for the N-block rows
        batch = blocks if n > 1 else [one]
        if is_reference and n > 1:
            batch = blocks[: max(1, min(count, 16))]  # the reference is slow; GB/s is per byte anyway
        nbytes = codec.encoded_nbytes(kv_heads, TOKENS, head_dim, torch.float16)
        bytes_in = 2 * sum(b.keys.numel() for b in batch) * 2
        copy_s = best_s(copy_one if n == 1 else copy_all, repeats) * (1 if n == 1 else bytes_in / input_bytes)
        if is_reference:
            outs = [torch.empty(nbytes, dtype=torch.uint8) for _ in batch]
            ks, vs = [b.keys for b in batch], [b.values for b in batch]
            encode_s = best_s(lambda: reference.encode(codec.fmt, ks, vs, outs), repeats, 0.0)
            dk, dv = [torch.empty_like(k) for k in ks], [torch.empty_like(v) for v in vs]
            decode_s = best_s(lambda: reference.decode(codec.fmt, outs, dk, dv), repeats, 0.0)
        elif n == 1:
            out = torch.empty(nbytes, dtype=torch.uint8)
            encode_s = best_s(lambda: codec.encode_into(one, out), repeats)
            encoded = codec.encode(one)
            decode_s = best_s(lambda: codec.decode(encoded, "cpu"), repeats)
        else:
            outs = [torch.empty(nbytes, dtype=torch.uint8) for _ in batch]
            encode_s = best_s(lambda: codec.encode_many_into(batch, outs), repeats)
            allocating_s = best_s(lambda: codec.encode_many(batch), repeats)
            encoded = codec.encode_many(batch)
            decode_s = best_s(lambda: codec.decode_many(encoded, "cpu"), repeats)
        gbs = lambda s: bytes_in / s / 1e9  # noqa: E731
        table.add_row(name, str(nbytes), f"{1 - nbytes / one.nbytes:.0%}", f"{gbs(copy_s):.2f}", f"{gbs(encode_s):.2f}",
                      f"{copy_s / encode_s:.2f}", f"{gbs(decode_s):.2f}", f"{copy_s / decode_s:.2f}",
                      f"{copy_s / allocating_s:.2f}" if allocating_s else "-")
    return table


def cuda_rows(kv_heads: int, head_dim: int, count: int, repeats: int) -> list[str]:
    """Device encode/decode of int4 against device copy_, and device -> host transfer in blocks/s."""
    sync = torch.cuda.synchronize
    keys, values = make_batch(count, kv_heads, head_dim, "cuda")
    input_bytes = 2 * keys.numel() * 2
    int4 = make_codec("int4")
    nbytes = int4.encoded_nbytes(kv_heads, TOKENS, head_dim, torch.float16)
    ks, vs = list(keys), list(values)
    payloads = torch.empty(count, nbytes, dtype=torch.uint8, device="cuda")  # [count, nbytes]
    keys_out, values_out = torch.empty_like(keys), torch.empty_like(values)

    def timed(fn):
        def run():
            fn()
            sync()
        return best_s(run, repeats)

    copy_s = timed(lambda: (keys_out.copy_(keys), values_out.copy_(values)))
    encode_s = timed(lambda: triton_kernels.encode(int4.fmt, ks, vs, list(payloads)))
    decode_s = timed(lambda: triton_kernels.decode(int4.fmt, list(payloads), list(keys_out), list(values_out)))
    pinned_fp16 = torch.empty((2, *keys.shape), dtype=torch.float16, pin_memory=True)  # [2, count, H, T, D]
    pinned_int4 = torch.empty((count, nbytes), dtype=torch.uint8, pin_memory=True)
    fp16_s = timed(lambda: (pinned_fp16[0].copy_(keys, non_blocking=True), pinned_fp16[1].copy_(values, non_blocking=True)))

    def int4_transfer():
        triton_kernels.encode(int4.fmt, ks, vs, list(payloads))
        pinned_int4.copy_(payloads, non_blocking=True)

    int4_s = timed(int4_transfer)
    slots = list(torch.empty((count, nbytes), dtype=torch.uint8, pin_memory=True))
    blocks = [KVBlock(k, v) for k, v in zip(ks, vs)]
    per_block_s = timed(lambda: [int4.encode_into(b, slot).wait() for b, slot in zip(blocks, slots)])
    gbs = lambda s: input_bytes / s / 1e9  # noqa: E731
    return [
        f"  {kv_heads}x{TOKENS}x{head_dim} fp16, {count} blocks on {torch.cuda.get_device_name()}:",
        f"    device copy_ {gbs(copy_s):.1f} GB/s; int4 encode {gbs(encode_s):.1f} GB/s ({copy_s / encode_s:.2f}), "
        f"decode {gbs(decode_s):.1f} GB/s ({copy_s / decode_s:.2f})",
        f"    device -> pinned host: fp16 {count / fp16_s:,.0f} blocks/s; int4 (encode + copy) {count / int4_s:,.0f} "
        f"blocks/s ({fp16_s / int4_s:.2f}x); int4 one block at a time (encode_into a pinned slot) "
        f"{count / per_block_s:,.0f} blocks/s ({fp16_s / per_block_s:.2f}x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch (and codec) threads; default torch's")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"CPU kernels: {'fused C (cpu_kernels.c)' if cpu_kernels.available() else 'reference: ' + str(cpu_kernels.build_error())}")
    console = Console(width=120)  # whole rows in a log too
    for kv_heads, head_dim in SHAPES:
        count = BATCH_BYTES // (2 * kv_heads * TOKENS * head_dim * 2)
        for n in (1, count):
            console.print(cpu_table(kv_heads, head_dim, count, repeats, n))
    if torch.cuda.is_available() and triton_kernels.available():
        print("CUDA:")
        for kv_heads, head_dim in SHAPES:
            count = BATCH_BYTES // (2 * kv_heads * TOKENS * head_dim * 2)
            for line in cuda_rows(kv_heads, head_dim, count, repeats):
                print(line, flush=True)
    else:
        print("CUDA: not available here; the device section did not run")


if __name__ == "__main__":
    main()
