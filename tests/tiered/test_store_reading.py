"""What the KV manager uses: per-layer rooms, writing tokens in place, reading blocks joined."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_block
from tiered import BlockKey, KVBlock, StoreConfig, TieredStore

HEADS, TOKENS, DIM = 2, 4, 8
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 4


def config(device_blocks: int, host_blocks: int = 64, **overrides) -> StoreConfig:
    fields = dict(
        device="cpu", device_bytes=device_blocks * BLOCK_BYTES, host_bytes=host_blocks * BLOCK_BYTES, block_tokens=TOKENS
    )
    fields.update(overrides)
    return StoreConfig(**fields)


def block(seed: int, tokens: int = TOKENS) -> KVBlock:
    return random_block(HEADS, tokens, DIM, torch.float32, seed)


def joined(blocks: list[KVBlock]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b.keys for b in blocks], dim=1), torch.cat([b.values for b in blocks], dim=1)


def test_rooms_keep_a_layers_blocks_in_consecutive_slots_and_evict_within_the_layer():
    with TieredStore(config(device_blocks=8, layers=2)) as store:
        for index in range(4):  # layers interleave, as a model appends them
            for layer in range(2):
                store.put(BlockKey("s", layer, index), block(seed=10 * layer + index))
        slots = {layer: [store._device_tier.slot_of(BlockKey("s", layer, i))[0] for i in range(4)] for layer in range(2)}
        assert slots == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
        store.put(BlockKey("s", 1, 4), block(seed=99))  # layer 1's room is full: its own LRU block leaves
        assert store.where(BlockKey("s", 1, 0)) == "host"
        assert all(store.where(BlockKey("s", 0, i)) == "device" for i in range(4))


def test_layer_beyond_the_configured_layers_is_rejected():
    with TieredStore(config(device_blocks=8, layers=2)) as store:
        with pytest.raises(ValueError, match="layers=2"):
            store.put(BlockKey("s", 2, 0), block(seed=0))


def test_too_few_device_slots_for_every_layer_is_rejected():
    with TieredStore(config(device_blocks=3, layers=4)) as store:
        with pytest.raises(ValueError, match="per layer"):
            store.put(BlockKey("s", 0, 0), block(seed=0))


def test_reading_consecutive_device_slots_gives_views_of_the_pool():
    with TieredStore(config(device_blocks=8)) as store:
        blocks = [block(seed=i) for i in range(3)] + [block(seed=3, tokens=2)]
        keys = [BlockKey("s", 0, i) for i in range(4)]
        store.put_many(zip(keys, blocks))
        with store.reading(keys) as (k, v):
            expected_k, expected_v = joined(blocks)
            assert k.shape == (HEADS, 3 * TOKENS + 2, DIM)
            assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
            assert k.untyped_storage().data_ptr() == store._device_tier.keys_pool.untyped_storage().data_ptr()


def test_reading_gathers_blocks_from_every_tier_without_moving_them():
    with TieredStore(config(device_blocks=2, host_blocks=8)) as store:
        blocks = [block(seed=i) for i in range(5)]
        keys = [BlockKey("s", 0, i) for i in range(5)]
        store.put_many(zip(keys, blocks))
        where = [store.where(k) for k in keys]
        assert where == ["host", "host", "host", "device", "device"]
        order = [4, 0, 3, 1, 2]  # device and host blocks, out of slot order
        with store.reading([keys[i] for i in order]) as (k, v):
            expected_k, expected_v = joined([blocks[i] for i in order])
            assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
        assert [store.where(k) for k in keys] == where
        assert store.stats()["tiers"]["host"]["hits"] == 3


@pytest.mark.parametrize("host_codec", ["raw", "int8"])
def test_reading_joins_device_runs_and_scattered_device_blocks_with_host_blocks(host_codec):
    """A few runs of consecutive device slots are copied run by run, more than VIEW_RUNS runs are
    gathered at once; either way each block's tokens land where a read of it alone puts them."""
    with TieredStore(config(device_blocks=6, host_blocks=16, host_codec=host_codec)) as store:
        keys = [BlockKey("s", 0, i) for i in range(12)]
        store.put_many((k, block(seed=i)) for i, k in enumerate(keys))
        device = [k for k in keys if store.where(k) == "device"]
        host = [k for k in keys if store.where(k) == "host"]
        assert len(device) == 6 and len(host) == 6
        alone = {}
        for k in keys:
            with store.reading([k]) as (kk, vv):
                alone[k] = (kk.clone(), vv.clone())
        orders = {
            "two runs": device[:3] + host[:3] + device[3:] + host[3:],
            "six runs": [k for pair in zip(device, host) for k in pair],  # > VIEW_RUNS: one gather
        }
        for name, order in orders.items():
            with store.reading(order) as (k, v):
                assert torch.equal(k, torch.cat([alone[key][0] for key in order], dim=1)), name
                assert torch.equal(v, torch.cat([alone[key][1] for key in order], dim=1)), name


def test_reading_refuses_missing_keys_and_a_partial_block_before_the_last():
    with TieredStore(config(device_blocks=4)) as store:
        store.put(BlockKey("s", 0, 0), block(seed=0, tokens=2))
        store.put(BlockKey("s", 0, 1), block(seed=1))
        with pytest.raises(KeyError, match="index=7"):
            with store.reading([BlockKey("s", 0, 0), BlockKey("s", 0, 7)]):
                pass
        with pytest.raises(ValueError, match="only the last block"):
            with store.reading([BlockKey("s", 0, 0), BlockKey("s", 0, 1)]):
                pass


def test_write_tokens_appends_in_place_and_promotes_first():
    with TieredStore(config(device_blocks=1, host_blocks=8)) as store:
        key = BlockKey("s", 0, 0)
        first = block(seed=1, tokens=1)
        store.write_tokens(key, 0, first.keys, first.values)  # creates the block
        rest = block(seed=2, tokens=TOKENS - 1)
        store.put(BlockKey("s", 0, 1), block(seed=3))  # pushes it to host
        assert store.where(key) == "host"
        store.write_tokens(key, 1, rest.keys, rest.values)
        assert store.where(key) == "device"
        got = store.get(key)
        assert got.tokens == TOKENS
        assert torch.equal(got.keys, torch.cat([first.keys, rest.keys], dim=1))
        assert torch.equal(got.values, torch.cat([first.values, rest.values], dim=1))
        assert store.block_stats(key).tokens == TOKENS


@pytest.mark.parametrize(
    "offset, tokens, error",
    [(3, 1, "holds 1 tokens"), (1, TOKENS, "block_tokens=4"), (2, 1, "holds 1 tokens")],
)
def test_write_tokens_rejects_holes_and_overflow(offset, tokens, error):
    with TieredStore(config(device_blocks=2)) as store:
        key = BlockKey("s", 0, 0)
        store.put(key, block(seed=0, tokens=1))
        more = block(seed=1, tokens=tokens)
        with pytest.raises(ValueError, match=error):
            store.write_tokens(key, offset, more.keys, more.values)
        assert store.peek(key).equal(block(seed=0, tokens=1))
    with TieredStore(config(device_blocks=2)) as store:
        with pytest.raises(ValueError, match="starts at offset 0"):
            store.write_tokens(BlockKey("s", 0, 5), 2, more.keys, more.values)


def test_set_score_reaches_the_eviction_policy():
    importance = dict(eviction="importance", eviction_kwargs=dict(sink_blocks=0, window_blocks=0))
    with TieredStore(config(device_blocks=4, **importance)) as store:
        keys = [BlockKey("s", 0, i) for i in range(5)]
        store.put_many((k, block(seed=i)) for i, k in enumerate(keys[:4]))
        for key, score in zip(keys, [3.0, 1.0, 2.0, 4.0]):
            store.set_score(key, score)
        assert store.block_stats(keys[1]).score == 1.0
        store.put(keys[4], block(seed=4))  # the lowest score leaves, not the oldest
        assert [store.where(k) for k in keys] == ["device", "host", "device", "device", "device"]


def test_reading_a_store_reopened_over_its_disk_tier(tmp_path):
    blocks = [block(seed=i) for i in range(6)]
    keys = [BlockKey("s", 0, i) for i in range(6)]
    disk = dict(disk_dir=str(tmp_path / "kv"), disk_bytes=1 << 20)
    with TieredStore(config(device_blocks=2, host_blocks=2, **disk)) as store:
        store.put_many(zip(keys, blocks))
        on_disk = [i for i, key in enumerate(keys) if store.where(key) == "disk"]
    assert on_disk == [0, 1]  # memory tiers do not outlive the store; the disk tier does
    with TieredStore(config(device_blocks=2, host_blocks=2, **disk)) as store:
        assert store.layout is None  # nothing on the device yet: the first read sets the layout
        with store.reading([keys[i] for i in on_disk]) as (k, v):
            expected_k, expected_v = joined([blocks[i] for i in on_disk])
            assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
        assert store.layout is not None
        with pytest.raises(KeyError, match="index=2"):
            with store.reading(keys[:3]):
                pass
