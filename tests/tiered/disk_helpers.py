"""Shared by the disk tier tests and the child processes they start: blocks that are a pure
function of their key, so a process can tell what any block must contain without being told."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

import torch

from tiered import BlockKey, Encoded, KVBlock, make_codec

HEADS, TOKENS, DIM = 2, 16, 32  # a block: 2 KiB of fp16 keys and 2 KiB of values
RAW = make_codec("raw")


def seed_of(key: BlockKey, generation: int = 0) -> int:
    return zlib.crc32(f"{key.namespace}|{key.layer}|{key.index}|{generation}".encode())


def block_for(key: BlockKey, generation: int = 0, dtype: torch.dtype = torch.float16, tokens: int = TOKENS,
              heads: int = HEADS, dim: int = DIM) -> KVBlock:
    """The block written under `key` in its `generation`. keys, values: [heads, tokens, dim]."""
    generator = torch.Generator().manual_seed(seed_of(key, generation))
    keys = torch.randn(heads, tokens, dim, generator=generator).to(dtype)
    values = torch.randn(heads, tokens, dim, generator=generator).to(dtype)
    return KVBlock(keys, values)


def encoded_for(key: BlockKey, generation: int = 0, **kwargs) -> Encoded:
    return RAW.encode(block_for(key, generation, **kwargs))


def matches(item: Encoded | None, key: BlockKey, generation: int = 0, **kwargs) -> bool:
    """True if `item` decodes to exactly the block of (key, generation)."""
    return item is not None and RAW.decode(item, "cpu").equal(block_for(key, generation, **kwargs))


def crash_ops(round_index: int, seed: int) -> Iterator[tuple[str, BlockKey, int]]:
    """The endless, deterministic operations a crash-test child performs: (op, key, generation),
    op "put" or "remove". Some removed keys are put again with the next generation."""
    rng = random.Random(seed)
    live: list[BlockKey] = []
    removed: list[BlockKey] = []
    generation: dict[BlockKey, int] = {}
    i = 0
    while True:
        roll = rng.random()
        if live and roll < 0.4:
            key = live.pop(rng.randrange(len(live)))
            removed.append(key)
            yield "remove", key, generation[key]
        elif removed and roll < 0.5:
            key = removed.pop(rng.randrange(len(removed)))
            generation[key] += 1
            live.append(key)
            yield "put", key, generation[key]
        else:
            key = BlockKey(f"r{round_index}", rng.randrange(4), i)
            generation[key] = 0
            live.append(key)
            yield "put", key, 0
        i += 1


def state_after(round_index: int, seed: int, ops: int) -> dict[BlockKey, int]:
    """key -> generation of every key stored after the first `ops` operations."""
    state: dict[BlockKey, int] = {}
    if ops <= 0:
        return state
    for n, (op, key, generation) in enumerate(crash_ops(round_index, seed), start=1):
        if op == "put":
            state[key] = generation
        else:
            del state[key]
        if n == ops:
            break
    return state
