"""The codecs inside a TieredStore: blocks spilled to the host (and disk) tier in a quantizing
codec come back within that codec's error, exactly what the codec alone decodes."""

from __future__ import annotations

import pytest
import torch

from tiered import CODECS, BlockKey, StoreConfig, TieredStore, make_codec

from .codec_helpers import MAX_RELATIVE_ERROR, outlier_block, relative_error

HEADS, TOKENS, DIM = 3, 64, 64  # SmolLM2-135M's KV heads and head dim
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2


def blocks(count: int = 10) -> list:
    """Full blocks, and a partial last one (a sequence's tail)."""
    out = [outlier_block(HEADS, TOKENS, DIM, seed=s) for s in range(count - 1)]
    return out + [outlier_block(HEADS, 23, DIM, seed=count)]


@pytest.mark.parametrize("name", sorted(CODECS))
def test_blocks_spilled_to_host_come_back_as_the_codec_decodes_them(name):
    codec = make_codec(name)
    originals = blocks()
    config = StoreConfig(device="cpu", device_bytes=3 * BLOCK_BYTES, host_bytes=64 * BLOCK_BYTES, host_codec=name)
    with TieredStore(config) as store:
        for i, block in enumerate(originals):
            store.put(BlockKey("seq", 0, i), block)
        spilled = [i for i in range(len(originals)) if store.where(BlockKey("seq", 0, i)) == "host"]
        assert len(spilled) == len(originals) - 3
        host = store.stats()["tiers"]["host"]
        expected_bytes = sum(codec.encoded_nbytes(*originals[i].keys.shape, torch.float16) for i in spilled)
        assert host["bytes_in"] == expected_bytes  # the host holds the codec's bytes, not the block's
        for i, original in enumerate(originals):
            was = store.where(BlockKey("seq", 0, i))  # gets promote, and push others down
            got = store.get(BlockKey("seq", 0, i))
            if was == "host":
                assert got.equal(codec.decode(codec.encode(original), "cpu"))
            else:
                assert got.equal(original)  # never left the device
            if name in ("raw", "fp16"):
                assert got.equal(original)  # lossless on an fp16 block
            else:
                limit = MAX_RELATIVE_ERROR.get(name, 2.0**-8)  # bf16: its 8-bit significand
                assert relative_error(got.keys, original.keys) < limit
                assert relative_error(got.values, original.values) < limit


@pytest.mark.parametrize("host_codec, disk_codec", [("int8", "int4"), ("int4", "int4"), ("raw", "int2:g64")])
def test_blocks_through_host_and_disk_stay_within_both_codecs_errors(tmp_path, host_codec, disk_codec):
    """Host -> disk re-encodes when the codecs differ: the errors of both add up, no more."""
    originals = blocks(12)
    host, disk = make_codec(host_codec), make_codec(disk_codec)
    config = StoreConfig(
        device="cpu", device_bytes=2 * BLOCK_BYTES, disk_dir=str(tmp_path / "kv"),
        host_bytes=3 * host.encoded_nbytes(HEADS, TOKENS, DIM, torch.float16),  # three host slots
        host_codec=host_codec, disk_codec=disk_codec,
    )
    limit = MAX_RELATIVE_ERROR.get(host.name, 0.0) + MAX_RELATIVE_ERROR[disk.name]
    with TieredStore(config) as store:
        for i, block in enumerate(originals):
            store.put(BlockKey("seq", 0, i), block)
        on_disk = [i for i in range(len(originals)) if store.where(BlockKey("seq", 0, i)) == "disk"]
        assert len(on_disk) >= 6
        for i in on_disk:
            got = store.get(BlockKey("seq", 0, i))
            through_host = host.decode(host.encode(originals[i]), "cpu")
            expected = through_host if host_codec == disk_codec else disk.decode(disk.encode(through_host), "cpu")
            assert got.equal(expected)
            assert relative_error(got.keys, originals[i].keys) < limit
            assert relative_error(got.values, originals[i].values) < limit


def test_a_spec_string_with_a_group_size_configures_the_store():
    config = StoreConfig(device="cpu", device_bytes=BLOCK_BYTES, host_bytes=8 * BLOCK_BYTES, host_codec="int4:g32")
    with TieredStore(config) as store:
        store.put(BlockKey("s", 0, 0), outlier_block(HEADS, TOKENS, DIM))
        store.put(BlockKey("s", 0, 1), outlier_block(HEADS, TOKENS, DIM, seed=1))
        assert store.where(BlockKey("s", 0, 0)) == "host"
        assert store.stats()["tiers"]["host"]["bytes_in"] == make_codec("int4", group=32).encoded_nbytes(HEADS, TOKENS, DIM, torch.float16)
    with pytest.raises(ValueError, match="codec spec"):
        StoreConfig(device="cpu", host_codec="int4:32")


@pytest.mark.parametrize("name", ["int8", "raw"])
def test_a_batch_put_spills_as_the_same_puts_one_at_a_time_do(name):
    """put_many makes room for its blocks at once (one encode_many of every victim); what lands
    where, and the bytes each block comes back as, are those of the same puts made one by one,
    also when the batch holds more new blocks than the device has slots."""
    codec = make_codec(name)
    originals = [outlier_block(HEADS, TOKENS if s % 4 else 23, DIM, seed=s) for s in range(12)]
    config = StoreConfig(device="cpu", device_bytes=4 * BLOCK_BYTES, host_bytes=64 * BLOCK_BYTES, host_codec=name)
    items = [(BlockKey("seq", 0, i), block) for i, block in enumerate(originals)]
    with TieredStore(config) as batched, TieredStore(config) as single:
        batched.put_many(items[:4])  # fills the device
        batched.put_many(items[4:7])  # three victims at once
        batched.put_many(items[7:])  # five new blocks for four slots: the last put makes its own room
        for key, block in items:
            single.put(key, block)
        for key, original in items:
            assert batched.where(key) == single.where(key)
            want = original if batched.where(key) == "device" else codec.decode(codec.encode(original), "cpu")
            assert batched.peek(key).equal(want) and single.peek(key).equal(want)
        for tier in ("device", "host"):
            mine, theirs = batched.stats()["tiers"][tier], single.stats()["tiers"][tier]
            assert (mine["evictions"], mine["bytes_in"]) == (theirs["evictions"], theirs["bytes_in"])


def test_a_batch_put_replaces_older_versions_held_below():
    codec = make_codec("int8")
    config = StoreConfig(device="cpu", device_bytes=2 * BLOCK_BYTES, host_bytes=3 * BLOCK_BYTES, host_codec="int8")
    first = [(BlockKey("seq", 0, i), outlier_block(HEADS, TOKENS, DIM, seed=i)) for i in range(5)]
    second = [(key, outlier_block(HEADS, TOKENS, DIM, seed=100 + i)) for i, (key, _) in enumerate(first[:2])]
    with TieredStore(config) as store:
        store.put_many(first)  # keys 0..2 go to the host, which is then full
        assert [store.where(key) for key, _ in first] == ["host"] * 3 + ["device"] * 2
        store.put_many(second)  # keys 0 and 1 come back new; 3 and 4 make room below
        assert [store.where(key) for key, _ in first] == ["device", "device", "host", "host", "host"]
        for key, block in second:
            assert store.peek(key).equal(block)
        for key, block in first[2:]:
            assert store.peek(key).equal(codec.decode(codec.encode(block), "cpu"))
        assert store.stats()["tiers"]["host"]["dropped"] == 0
