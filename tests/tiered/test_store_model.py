"""TieredStore against a plain dict: 10,000 random operations, checked after every step."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import random_block
from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

HEADS, TOKENS, DIM = 2, 8, 4
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2
KEYS = [BlockKey(f"seq{s}", layer, index) for s in range(3) for layer in range(2) for index in range(6)]  # 36 keys


def check_against(store: TieredStore, reference: dict[BlockKey, KVBlock], dropped_before: int) -> int:
    """Assert the store holds exactly the reference, less blocks it reports dropped; return drops."""
    stats = store.stats()
    bottom = store.tier_names[-1]
    missing = [key for key in reference if key not in store]
    assert stats["tiers"][bottom]["dropped"] - dropped_before == len(missing)
    for key in missing:  # a drop is the bottom tier making room, and the store says so
        del reference[key]
    assert set(store.keys()) == set(reference)
    for key, expected in reference.items():
        assert store.where(key) in ("device", "host")
        assert store.peek(key).equal(expected), key
    for name, tier in stats["tiers"].items():
        assert 0 <= tier["used_bytes"] <= tier["capacity_bytes"], name
    assert sum(tier["blocks"] for tier in stats["tiers"].values()) == len(reference)
    return stats["tiers"][bottom]["dropped"]


@pytest.mark.parametrize(
    "eviction, host_blocks, steps",  # device + host hold every key, or the small hosts drop blocks
    [("lru", len(KEYS), 10_000), ("lfu", len(KEYS), 2_500), ("fifo", 10, 2_500), ("lru", 12, 2_500)],
)
def test_random_operations_match_a_dict(eviction, host_blocks, steps):
    rng = random.Random(f"{eviction}-{host_blocks}")
    config = StoreConfig(
        device="cpu", device_bytes=6 * BLOCK_BYTES, host_bytes=host_blocks * BLOCK_BYTES,
        block_tokens=TOKENS, eviction=eviction,
    )
    reference: dict[BlockKey, KVBlock] = {}
    dropped = 0
    gets = hits = 0
    with TieredStore(config) as store:
        for step in range(steps):
            key = rng.choice(KEYS)
            op = rng.random()
            if op < 0.4:
                value = random_block(HEADS, rng.randint(1, TOKENS), DIM, torch.float16, seed=step)
                store.put(key, value)
                reference[key] = value
            elif op < 0.75:
                got = store.get(key)
                gets += 1
                if key in reference:
                    hits += 1
                    assert got.equal(reference[key])
                    assert store.where(key) == "device"
                else:
                    assert got is None
            elif op < 0.9:
                assert store.remove(key) == (key in reference)
                reference.pop(key, None)
            else:
                wanted = rng.sample(KEYS, 4)
                store.prefetch(wanted).result(timeout=10)
                for k in wanted:  # up, unless making room for another dropped it
                    assert store.where(k) in ("device", None)
            dropped = check_against(store, reference, dropped)
        stats = store.stats()
        assert (stats["gets"], stats["hits"]) == (gets, hits)
        if host_blocks == len(KEYS):
            assert dropped == 0  # device + host hold every key: nothing may be lost
        else:
            assert dropped > 0
