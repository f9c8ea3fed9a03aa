"""The shared tier: one directory, many stores. Content-addressed blocks one store writes another
reads; private blocks stay private and go when their store closes; damaged, torn or foreign-codec
files are misses, never wrong data."""

from __future__ import annotations

import os

import pytest
import torch

from tiered import BlockKey, KVBlock, StoreConfig, TieredStore
from tiered.codecs import make_codec
from tiered.content import content_key
from tiered.shared import SUFFIX, TRIM_FRACTION, SharedTier

TOKENS = 16
CONTENT = content_key(bytes(range(32)), layer=0, index=0)
PRIVATE = BlockKey("s:one", 0, 0)


def block(seed: int = 0) -> KVBlock:
    generator = torch.Generator().manual_seed(seed)
    # keys, values: [kv_heads=2, tokens=16, head_dim=8]
    return KVBlock(torch.randn(2, TOKENS, 8, generator=generator), torch.randn(2, TOKENS, 8, generator=generator))


def encoded(seed: int = 0, codec: str = "raw"):
    return make_codec(codec).encode(block(seed))


def test_a_content_block_written_by_one_tier_is_read_by_another(tmp_path):
    writer, reader = SharedTier(tmp_path, 1 << 20), SharedTier(tmp_path, 1 << 20)
    assert CONTENT not in reader
    item = encoded(1)
    assert writer.put(CONTENT, item) == []
    assert reader.lookup(CONTENT) and list(reader.keys()) == [CONTENT]
    got = reader.get(CONTENT)
    assert got.codec == item.codec and got.shape == item.shape and torch.equal(got.payload, item.payload)
    assert reader.held(CONTENT) == (reader.used_bytes, TOKENS)
    assert oct(writer.path_of(CONTENT).stat().st_mode & 0o777) == "0o600"
    writer.close()
    assert reader.get(CONTENT) is not None  # shared blocks outlive their writer


def test_private_blocks_stay_private_and_leave_with_their_store(tmp_path):
    one, other = SharedTier(tmp_path, 1 << 20), SharedTier(tmp_path, 1 << 20)
    one.put(PRIVATE, encoded(2))
    assert PRIVATE in one and PRIVATE not in other
    path = one.path_of(PRIVATE)
    assert one.remove(PRIVATE) and not path.exists() and PRIVATE not in one
    one.put(PRIVATE, encoded(2))
    one.close()
    assert not path.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_files_are_misses(tmp_path, damage):
    tier = SharedTier(tmp_path, 1 << 20)
    tier.put(CONTENT, encoded(3))
    path = tier.path_of(CONTENT)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    fresh = SharedTier(tmp_path, 1 << 20)
    assert tier.get(CONTENT) is None and CONTENT not in tier.keys()
    assert fresh.get(CONTENT) is None


def test_a_block_in_another_codec_is_a_miss(tmp_path):
    SharedTier(tmp_path, 1 << 20, codec="int8").put(CONTENT, encoded(4, "int8"))
    raw = SharedTier(tmp_path, 1 << 20, codec=make_codec("raw").spec)
    assert not raw.lookup(CONTENT) and raw.get(CONTENT) is None


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="capacity_bytes"):
        SharedTier(tmp_path, 0)
    with pytest.raises(TypeError, match="root"):
        SharedTier(3, 1 << 20)
    with pytest.raises(TypeError, match="Encoded"):
        SharedTier(tmp_path, 1 << 20).put(CONTENT, block())
    with pytest.raises(TypeError, match="shared_dir"):
        StoreConfig(device="cpu", shared_dir=5)
    with pytest.raises(ValueError, match="shared_bytes"):
        StoreConfig(device="cpu", shared_dir=tmp_path, shared_bytes=0)


def config(tmp_path, **overrides) -> StoreConfig:
    options = dict(device="cpu", device_bytes=64 << 10, host_bytes=64 << 10, block_tokens=TOKENS,
                   shared_dir=tmp_path / "shared")
    return StoreConfig(**{**options, **overrides})


def test_stores_share_sealed_blocks_through_the_shared_tier(tmp_path):
    with TieredStore(config(tmp_path)) as first, TieredStore(config(tmp_path)) as second:
        assert first.tier_names == ["device", "host", "shared"]
        first.put(PRIVATE, block(5))
        assert first.seal(PRIVATE, CONTENT)
        first.flush()  # written through
        assert CONTENT not in second
        assert second.discover([CONTENT, content_key(bytes(32), 0, 1)]) == 1
        assert second.where(CONTENT) == "shared"
        got = second.get(CONTENT)
        assert torch.equal(got.keys, block(5).keys) and torch.equal(got.values, block(5).values)
        assert second.discover([CONTENT]) == 0  # known now


def test_a_store_with_a_disk_and_a_shared_tier(tmp_path):
    small = dict(device_bytes=4 << 10, host_bytes=4 << 10)  # two blocks each
    with TieredStore(config(tmp_path, disk_dir=tmp_path / "disk", **small)) as store:
        assert store.tier_names == ["device", "host", "disk", "shared"]
        for i in range(12):  # more than the device and host tiers hold: blocks move down
            store.put(BlockKey("s:two", 0, i), block(i))
        assert store.stats()["tiers"]["disk"]["blocks"] > 0
        for i in range(12):
            assert torch.equal(store.get(BlockKey("s:two", 0, i)).keys, block(i).keys)
    with TieredStore(config(tmp_path, **small)) as store:  # the shared tier at the bottom takes what host evicts
        for i in range(8):
            store.put(BlockKey("s:three", 0, i), block(i))
        assert store.stats()["tiers"]["shared"]["blocks"] > 0
        for i in range(8):
            assert torch.equal(store.get(BlockKey("s:three", 0, i)).values, block(i).values)
    without = TieredStore(StoreConfig(device="cpu", block_tokens=TOKENS))
    assert without.discover([CONTENT]) == 0
    without.close()


def distinct(i: int):
    return content_key(bytes([i]) * 32, layer=0, index=0)


def directory_bytes(root) -> int:
    return sum(path.stat().st_size for path in root.rglob(f"*{SUFFIX}"))


def test_the_directory_is_trimmed_to_its_budget_least_recently_used_first(tmp_path):
    probe = SharedTier(tmp_path / "probe", 1 << 20)
    probe.put(distinct(0), encoded(0))
    one_block = probe.path_of(distinct(0)).stat().st_size  # every block file here is this long
    capacity = 10 * one_block
    root = tmp_path / "shared"
    writer, other = SharedTier(root, capacity), SharedTier(root, capacity)
    for i in range(10):
        writer.put(distinct(i), encoded(i))
        os.utime(writer.path_of(distinct(i)), ns=(i * 10**9, i * 10**9))  # written a second apart
    assert other.get(distinct(0)) is not None  # read by another store: now the most recent
    dropped = []
    for i in range(10, 40):
        dropped += writer.put(distinct(i), encoded(i))
        # within budget, give or take what is written between trims
        assert directory_bytes(root) <= capacity + capacity // TRIM_FRACTION + one_block
    writer.trim()
    assert directory_bytes(root) <= capacity
    assert distinct(0) in dropped or writer.path_of(distinct(0)).exists()
    assert distinct(1) in dropped and not writer.path_of(distinct(1)).exists()  # the oldest unread went first
    assert distinct(1) not in set(writer.keys())
    assert writer.get(distinct(39)) is not None  # the newest stays
    # a block another store trimmed is a miss for this one, and forgotten
    assert other.get(distinct(1)) is None and distinct(1) not in set(other.keys())


def test_a_store_over_a_trimmed_shared_directory_misses_never_reads_wrong_data(tmp_path):
    # device and host hold 4 blocks of 2 KiB each: the rest live only in the shared directory
    config = StoreConfig(device="cpu", device_bytes=1 << 13, host_bytes=1 << 13, shared_dir=str(tmp_path / "shared"),
                         block_tokens=TOKENS, disk_write="through")
    store = TieredStore(config)
    try:
        keys = [distinct(i) for i in range(64)]
        for i, key in enumerate(keys):
            store.put(BlockKey("s:one", 0, i), block(i))
            store.seal(BlockKey("s:one", 0, i), key)
        store.flush()
        shared = SharedTier(tmp_path / "shared", 4 * (1 << 10))
        shared.trim()  # another store with a small budget trims the directory
        assert 0 < directory_bytes(tmp_path / "shared") <= 4 * (1 << 10)
        misses = 0
        for i, key in enumerate(keys):
            got = store.get(key)
            if got is None:
                misses += 1
                continue
            assert torch.equal(got.keys, block(i).keys) and torch.equal(got.values, block(i).values)
        assert 0 < misses < len(keys)
    finally:
        store.close()
