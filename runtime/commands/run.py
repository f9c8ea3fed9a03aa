"""`tiered run`: the main job. Until the model runtime lands, it walks blocks through the tiers."""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from tiered import BlockKey, KVBlock, StoreConfig, TieredStore


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="run a long multi-turn session on a tiered store")
    parser.add_argument("--blocks", type=int, default=256, help="blocks to write per turn")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--device-mib", type=int, default=8)
    parser.add_argument("--host-mib", type=int, default=32)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    kv_heads, block_tokens, head_dim = 3, 64, 64
    config = StoreConfig(device_bytes=args.device_mib << 20, host_bytes=args.host_mib << 20, block_tokens=block_tokens)
    generator = torch.Generator().manual_seed(0)
    with TieredStore(config) as store:
        for turn in range(args.turns):
            start_s = time.perf_counter()
            for index in tqdm(range(args.blocks), desc=f"turn {turn}: writing blocks", unit="block"):
                # keys, values: [kv_heads, block_tokens, head_dim]
                shape = (kv_heads, block_tokens, head_dim)
                block = KVBlock(torch.randn(shape, generator=generator).half(), torch.randn(shape, generator=generator).half())
                store.put(BlockKey(f"turn{turn}", 0, index), block)
            store.prefetch([BlockKey(f"turn{turn}", 0, i) for i in range(args.blocks // 4)]).result()
            found = sum(store.get(BlockKey(f"turn{t}", 0, 0)) is not None for t in range(turn + 1))
            print(f"turn {turn}: {args.blocks} blocks in {time.perf_counter() - start_s:.2f} s; "
                  f"first block of {found}/{turn + 1} turns still stored")
        for name, tier in store.stats()["tiers"].items():
            print(f"{name:>6}: {tier['blocks']:5d} blocks, {tier['used_bytes'] >> 20:4d}/{tier['capacity_bytes'] >> 20} MiB, "
                  f"hits {tier['hits']}, evictions {tier['evictions']}, dropped {tier['dropped']}")
    return 0
