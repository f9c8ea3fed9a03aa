"""Sharing by content: seal relabels or deduplicates, references keep blocks in the store longest,
and write-through puts sealed blocks on disk at once, where a new process finds them."""

from __future__ import annotations

import pytest

from tests.conftest import random_block
from tests.tiered.test_disk_full import InjectedFull
from tiered import BlockKey, StoreConfig, TieredStore
from tiered.content import chain_root, content_key

HEADS, TOKENS, DIM = 2, 16, 8
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2
ROOT = chain_root("model", TOKENS)


def config(tmp_path=None, device_blocks=4, host_blocks=8, **overrides) -> StoreConfig:
    fields = dict(device="cpu", device_bytes=device_blocks * BLOCK_BYTES, host_bytes=host_blocks * BLOCK_BYTES,
                  block_tokens=TOKENS)
    if tmp_path is not None:
        fields.update(disk_dir=str(tmp_path / "kv"), disk_bytes=64 << 20)
    fields.update(overrides)
    return StoreConfig(**fields)


def block(seed: int, tokens: int = TOKENS):
    return random_block(HEADS, tokens, DIM, seed=seed)


def ckey(n: int, layer: int = 0) -> BlockKey:
    return content_key(n.to_bytes(16, "little"), layer, 0)


def test_seal_relabels_in_place_and_keeps_the_data():
    with TieredStore(config()) as store:
        private = BlockKey("s:a", 0, 0)
        store.put(private, block(1))
        assert store.seal(private, ckey(1)) is True
        assert private not in store and store.where(ckey(1)) == "device"
        assert store.peek(ckey(1)).equal(block(1))
        assert store.stats()["sealed"] == 1


def test_sealing_content_that_is_stored_drops_the_copy():
    with TieredStore(config()) as store:
        store.put(BlockKey("s:a", 0, 0), block(1))
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        store.put(BlockKey("s:b", 0, 0), block(2))  # other bits, same address: the first stays
        store.retain([BlockKey("s:b", 0, 0)])
        assert store.seal(BlockKey("s:b", 0, 0), ckey(1)) is False
        assert BlockKey("s:b", 0, 0) not in store and store.peek(ckey(1)).equal(block(1))
        assert store.references(ckey(1)) == 1  # references move with the seal
        assert store.stats()["seal_hits"] == 1


def test_seal_refuses_what_is_not_a_full_stored_block_and_content_is_immutable():
    with TieredStore(config()) as store:
        store.put(BlockKey("s:a", 0, 0), block(1, tokens=5))
        with pytest.raises(ValueError, match="only full blocks"):
            store.seal(BlockKey("s:a", 0, 0), ckey(1))
        with pytest.raises(KeyError):
            store.seal(BlockKey("s:a", 0, 9), ckey(1))
        with pytest.raises(ValueError, match="keeps its layer"):
            store.seal(BlockKey("s:a", 0, 0), ckey(1, layer=1))
        store.write_tokens(BlockKey("s:a", 0, 0), 5, block(2, 11).keys, block(2, 11).values)
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        with pytest.raises(ValueError, match="immutable"):
            store.write_tokens(ckey(1), 0, block(3, 1).keys, block(3, 1).values)


def test_blocks_with_readers_leave_the_store_last():
    with TieredStore(config(device_blocks=1, host_blocks=3)) as store:
        keys = [BlockKey("s:a", 0, i) for i in range(4)]
        for i, key in enumerate(keys):
            store.put(key, block(i))
        store.retain(keys[:2])  # the two oldest, first in LRU order
        store.put(BlockKey("s:a", 0, 4), block(4))
        store.put(BlockKey("s:a", 0, 5), block(5))
        assert all(store.holding(keys[:2])) and not any(store.holding(keys[2:]))
        store.release(keys[:2])
        assert store.references(keys[0]) == 0
        store.put(BlockKey("s:a", 0, 6), block(6))
        assert keys[0] not in store  # unreferenced now: the oldest leaves first again


def test_write_through_persists_sealed_blocks_for_the_next_process(tmp_path):
    with TieredStore(config(tmp_path)) as store:
        store.put(BlockKey("s:a", 0, 0), block(1))
        store.put(BlockKey("s:a", 0, 1), block(2, tokens=3))  # partial: never written through
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        store.flush()
        stats = store.stats()
        assert store.where(ckey(1)) == "device" and stats["persisted_blocks"] == 1
        assert stats["tiers"]["disk"]["blocks"] == 1 and stats["write_through_bytes"] == BLOCK_BYTES
    with TieredStore(config(tmp_path)) as store:
        assert store.where(ckey(1)) == "disk" and BlockKey("s:a", 0, 1) not in store
        assert store.get(ckey(1)).equal(block(1))
        assert store.stats()["tiers"]["disk"]["blocks"] == 1  # promoted, and the disk copy stays


def test_a_written_through_block_is_demoted_to_disk_without_a_write(tmp_path):
    with TieredStore(config(tmp_path, device_blocks=1, host_blocks=1)) as store:
        store.put(BlockKey("s:a", 0, 0), block(1))
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        store.flush()
        written = store.stats()["tiers"]["disk"]["bytes_in"]
        store.put(BlockKey("s:a", 0, 1), block(2))  # ckey(1) to host
        store.put(BlockKey("s:a", 0, 2), block(3))  # and on to disk, where its copy is
        stats = store.stats()
        assert store.where(ckey(1)) == "disk" and stats["tiers"]["disk"]["bytes_in"] == written
        assert store.get(ckey(1)).equal(block(1))
        on_disk = store.stats()["tiers"]["disk"]["blocks"]
        store.remove(ckey(1))  # from the device and from the disk
        stats = store.stats()
        assert ckey(1) not in store and stats["persisted_blocks"] == 0 and stats["tiers"]["disk"]["blocks"] == on_disk - 1


def test_write_back_writes_only_what_is_evicted(tmp_path):
    with TieredStore(config(tmp_path, disk_write="back")) as store:
        store.put(BlockKey("s:a", 0, 0), block(1))
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        store.flush()
        assert store.stats()["tiers"]["disk"]["blocks"] == 0 and store.stats()["write_through_blocks"] == 0
    with pytest.raises(ValueError, match="disk_write must be one of"):
        config(tmp_path, disk_write="sometimes")


def test_a_full_disk_fails_write_through_visibly_and_loses_nothing(tmp_path, monkeypatch):
    full = InjectedFull(monkeypatch)
    with TieredStore(config(tmp_path)) as store:
        full.fill()
        store.put(BlockKey("s:a", 0, 0), block(1))
        store.seal(BlockKey("s:a", 0, 0), ckey(1))
        store.flush()
        stats = store.stats()
        assert stats["write_through_errors"] == 1 and "No space" in stats["last_write_error"]
        assert store.peek(ckey(1)).equal(block(1)) and stats["persisted_blocks"] == 0
        full.free()
        store.put(BlockKey("s:a", 0, 1), block(2))
        store.seal(BlockKey("s:a", 0, 1), ckey(2))
        store.flush()
        assert store.stats()["persisted_blocks"] == 1
