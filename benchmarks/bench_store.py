"""put -> spill -> get through a TieredStore, next to bare tensor.copy_ of the same bytes, in one run.

The device tier holds DEVICE_BLOCKS blocks; the host tier holds all of them. Once the device is
full, each put copies the new block into a slot and spills the least recently used block to host,
and each get of a spilled block copies it back into a slot and spills another: two block copies per
operation. The baseline does those same copies with bare `copy_` (keys and values separately, as
the store does) between buffers of the same sizes, so the ratio is the store's share of what the
memory system allows.

    python benchmarks/bench_store.py            # full run
    python benchmarks/bench_store.py --quick    # fewer blocks, fewer runs
    python benchmarks/bench_store.py --host-codec int8   # spills quantized (a batch put spills in one kernel call)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from spread import spread

from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

BLOCK_TOKENS = 64
DEVICE_BLOCKS = 64
SHAPES = [(3, 64), (8, 128)]  # (kv_heads, head_dim): SmolLM2-135M, and a Llama-8B-like layer


def make_blocks(count: int, kv_heads: int, head_dim: int) -> list[KVBlock]:
    generator = torch.Generator().manual_seed(0)
    # keys, values: [kv_heads, BLOCK_TOKENS, head_dim] fp16
    shape = (kv_heads, BLOCK_TOKENS, head_dim)
    return [
        KVBlock(torch.randn(shape, generator=generator).half(), torch.randn(shape, generator=generator).half())
        for _ in range(count)
    ]


def time_store(blocks: list[KVBlock], batch: int, host_codec: str = "raw") -> tuple[float, float]:
    """Seconds for putting every block, then getting every block back (each spills one).

    A first, untimed round maps the pools' memory, as a long-running store has it; the second
    round, with new keys, is timed.
    """
    block_bytes = blocks[0].nbytes
    config = StoreConfig(
        device="cpu", device_bytes=DEVICE_BLOCKS * block_bytes, host_bytes=(len(blocks) + 1) * block_bytes,
        block_tokens=BLOCK_TOKENS, host_codec=host_codec,
    )
    with TieredStore(config) as store:
        for round_ in range(2):
            keys = [BlockKey(f"round{round_}", 0, i) for i in range(len(blocks))]
            for key in store.keys():
                store.remove(key)
            store.put_many(zip(keys[:DEVICE_BLOCKS], blocks[:DEVICE_BLOCKS]))  # fill the device first
            rest = list(zip(keys[DEVICE_BLOCKS:], blocks[DEVICE_BLOCKS:]))
            start = time.perf_counter()
            for i in range(0, len(rest), batch):
                store.put_many(rest[i : i + batch]) if batch > 1 else store.put(*rest[i])
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(0, len(keys) - DEVICE_BLOCKS, batch):
                store.get_many(keys[i : i + batch]) if batch > 1 else store.get(keys[i])
            get_s = time.perf_counter() - start
        assert store.stats()["tiers"]["host"]["hits"] == 2 * (len(keys) - DEVICE_BLOCKS)
    return put_s, get_s


def time_copies(blocks: list[KVBlock]) -> float:
    """Seconds for the same two block copies per operation with bare copy_, per phase. Its buffers
    are written once first (zeros_like), as the store's untimed round maps its pools."""
    device_k = [torch.zeros_like(blocks[0].keys) for _ in range(DEVICE_BLOCKS)]
    device_v = [torch.zeros_like(blocks[0].values) for _ in range(DEVICE_BLOCKS)]
    host_k = [torch.zeros_like(b.keys) for b in blocks]
    host_v = [torch.zeros_like(b.values) for b in blocks]
    start = time.perf_counter()
    for i in range(DEVICE_BLOCKS, len(blocks)):
        slot = i % DEVICE_BLOCKS
        host_k[i - DEVICE_BLOCKS].copy_(device_k[slot])  # spill the slot's block
        host_v[i - DEVICE_BLOCKS].copy_(device_v[slot])
        device_k[slot].copy_(blocks[i].keys)  # copy the new block in
        device_v[slot].copy_(blocks[i].values)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, default=96, help="working set of blocks, MiB")
    parser.add_argument("--host-codec", default="raw", help="the host tier's codec (raw: the copies the baseline makes)")
    parser.add_argument("--runs", type=int, default=5, help="runs of every row (median and range)")
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    mib = 24 if args.quick else args.mib
    table = Table(
        "block", "KiB", "batch", "put GB/s", "get GB/s", "copy_ GB/s", "put ratio", "get ratio",
        title=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, host codec {args.host_codec}: medians of {runs} runs (range)",
    )
    for kv_heads, head_dim in SHAPES:
        blocks = make_blocks(max(4 * DEVICE_BLOCKS, (mib << 20) // (4 * kv_heads * BLOCK_TOKENS * head_dim)), kv_heads, head_dim)
        moved_bytes = (len(blocks) - DEVICE_BLOCKS) * blocks[0].nbytes
        copy_gbs = [moved_bytes / time_copies(blocks) / 1e9 for _ in range(runs)]
        for batch in (1, 64):
            timed = [time_store(blocks, batch, args.host_codec) for _ in range(runs)]
            put_gbs = [moved_bytes / put_s / 1e9 for put_s, _ in timed]
            get_gbs = [moved_bytes / get_s / 1e9 for _, get_s in timed]
            copy = statistics.median(copy_gbs)
            table.add_row(
                f"{kv_heads}x{BLOCK_TOKENS}x{head_dim} fp16", str(blocks[0].nbytes >> 10), str(batch),
                spread(put_gbs), spread(get_gbs), spread(copy_gbs),
                f"{statistics.median(put_gbs) / copy:.2f}", f"{statistics.median(get_gbs) / copy:.2f}",
            )
    Console(width=120).print(table)  # whole rows in a log too


if __name__ == "__main__":
    main()
