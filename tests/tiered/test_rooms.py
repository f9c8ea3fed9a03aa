"""RoomPolicies: one eviction order per room, the same order one policy over the tier gives each
room for policies that rank a block by its own statistics."""

from __future__ import annotations

import random

import pytest

from policies import BlockStats, make_eviction
from tiered import BlockKey, StoreConfig, TieredStore
from tiered.rooms import RoomPolicies

from .test_store_reading import BLOCK_BYTES, TOKENS, block

ROOMS = 3


def room_of(key: BlockKey) -> int:
    return key.layer % ROOMS


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu", "importance"])
def test_each_room_is_ordered_as_one_policy_orders_its_blocks(eviction):
    rooms, single = RoomPolicies(lambda: make_eviction(eviction), ROOMS, room_of), make_eviction(eviction)
    chance = random.Random(0)
    stats: dict[BlockKey, BlockStats] = {}
    for step in range(600):  # inserts, reads and removals in random order over 5 layers
        key = BlockKey("s", chance.randrange(5), chance.randrange(12))
        if key not in stats:
            stats[key] = BlockStats(1, "device", step, step, step, score=chance.random())
            rooms.on_insert(key, stats[key]), single.on_insert(key, stats[key])
        elif chance.random() < 0.2:
            del stats[key]
            rooms.on_remove(key), single.on_remove(key)
        else:
            stats[key].hits += 1
            stats[key].last_access_step = step
            stats[key].score = chance.random()
            rooms.on_update(key, stats[key]), single.on_update(key, stats[key])
    assert len(rooms) == len(stats) and all(key in rooms for key in stats)
    for room in range(ROOMS):
        assert list(rooms.candidates(room)) == [key for key in single.candidates() if room_of(key) == room]


def test_a_full_layer_evicts_its_own_least_recently_used_block_among_many_layers():
    """30 layers in one device tier: a put into a full layer's room takes that layer's LRU block."""
    config = StoreConfig(device="cpu", device_bytes=30 * 2 * BLOCK_BYTES, host_bytes=200 * BLOCK_BYTES,
                         block_tokens=TOKENS, layers=30)
    with TieredStore(config) as store:
        for index in range(2):
            for layer in range(30):
                store.put(BlockKey("s", layer, index), block(seed=index))
        store.get(BlockKey("s", 17, 0))  # block 1 of layer 17 is now its least recently used
        store.put(BlockKey("s", 17, 2), block(seed=2))
        assert store.where(BlockKey("s", 17, 1)) == "host"
        assert sum(store.where(BlockKey("s", layer, i)) == "device" for layer in range(30) for i in range(2)) == 59
