"""The disk tier as the bottom of a TieredStore: blocks flow device -> host -> disk and back exact,
a new process finds them on the same directory, and the store's counters stay right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiered.disk_helpers import DIM, HEADS, TOKENS, block_for, encoded_for
from tiered import CODECS, BlockKey, StoreConfig, TieredStore, make_codec
from tiered.disk import DiskTier, IdentityMismatch

CHILD = Path(__file__).with_name("disk_child.py")
BLOCK_BYTES = 2 * HEADS * TOKENS * DIM * 2  # fp16 keys + values of one full block


def disk_config(directory: Path, device_blocks: int = 2, host_blocks: int = 4, **overrides) -> StoreConfig:
    fields = dict(device="cpu", device_bytes=device_blocks * BLOCK_BYTES, host_bytes=host_blocks * BLOCK_BYTES,
                  block_tokens=TOKENS, disk_dir=str(directory), disk_bytes=8 << 20, disk_segment_bytes=64 << 10)
    fields.update(overrides)
    return StoreConfig(**fields)


def run_child(mode: str, job: dict, tmp_path: Path) -> dict:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, str(CHILD), mode, str(path)], capture_output=True, text=True,
                          cwd=CHILD.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_blocks_flow_device_host_disk_and_back_exact(tmp_path):
    keys = [BlockKey("seq", i % 2, i) for i in range(30)]
    tokens = {key: TOKENS if key.index < 29 else 5 for key in keys}  # the last block is partial
    with TieredStore(disk_config(tmp_path / "disk")) as store:
        for key in keys:
            store.put(key, block_for(key, tokens=tokens[key]))
        places = [store.where(key) for key in keys]
        assert places.count("disk") == 24 and places.count("host") == 4 and places.count("device") == 2
        for key in keys:
            assert store.get(key).equal(block_for(key, tokens=tokens[key]))
        stats = store.stats()["tiers"]["disk"]
        assert stats["bytes_in"] >= 24 * BLOCK_BYTES and stats["promotions"] >= 24 and stats["hits"] >= 24
        assert stats["dropped"] == 0 and 0 < stats["used_bytes"] <= stats["capacity_bytes"]
        assert store.stats()["misses"] == 0


def test_a_store_reopened_in_a_new_process_finds_its_disk_blocks(tmp_path):
    directory = tmp_path / "disk"
    keys = [BlockKey("seq", i % 3, i) for i in range(40)]
    config = disk_config(directory, fingerprint="test-model:1")
    with TieredStore(config) as store:
        for key in keys:
            store.put(key, block_for(key, tokens=TOKENS if key.index < 39 else 7))
        on_disk = [key for key in keys if store.where(key) == "disk"]
    assert len(on_disk) == 34
    job = {"config": {k: v for k, v in config.__dict__.items() if k != "eviction_kwargs"},
           "expected": [[k.namespace, k.layer, k.index, 0, TOKENS if k.index < 39 else 7] for k in on_disk]}
    result = run_child("verify-store", job, tmp_path)
    assert result == {"blocks": 34, "where": ["disk"] * 34, "equal": 34, "expected": 34}


def test_a_tier_reopened_in_a_new_process_finds_every_block(tmp_path):
    directory = tmp_path / "disk"
    keys = [BlockKey(f"n{i % 4}", i % 5, i) for i in range(120)]
    tier = DiskTier(directory, 8 << 20, segment_bytes=64 << 10)
    for key in keys:
        tier.put(key, encoded_for(key))
    for key in keys[:20]:
        tier.remove(key)
    tier.close()
    job = {"dir": str(directory), "capacity_bytes": 8 << 20,
           "expected": [[k.namespace, k.layer, k.index, 0] for k in keys[20:]]}
    assert run_child("verify-tier", job, tmp_path) == {"keys": 100, "equal": 100, "expected": 100,
                                                       "from_snapshot": True, "damaged": 0}
    (directory / "INDEX.snapshot").unlink()
    assert run_child("verify-tier", job, tmp_path)["equal"] == 100


def test_a_block_promoted_while_its_segment_is_evicted_is_not_counted_dropped(tmp_path):
    # fp32 blocks of 64 KiB: one record per 64 KiB segment, and the disk holds three of them
    shape = dict(heads=2, tokens=64, dim=64, dtype=torch.float32)
    block_bytes = 2 * 2 * 64 * 64 * 4
    config = StoreConfig(device="cpu", device_bytes=block_bytes, host_bytes=block_bytes, block_tokens=64,
                         disk_dir=str(tmp_path / "disk"), disk_bytes=int(3.5 * block_bytes),
                         disk_segment_bytes=64 << 10)
    keys = [BlockKey("s", 0, i) for i in range(5)]
    with TieredStore(config) as store:
        for key in keys:
            store.put(key, block_for(key, **shape))
        assert [store.where(k) for k in keys] == ["disk"] * 3 + ["host", "device"]
        # promoting keys[0] pushes keys[4] to host and keys[3] to disk, whose room-making evicts
        # the oldest segment: the one holding keys[0], which the store has in hand
        got = store.get(keys[0])
        assert got.equal(block_for(keys[0], **shape))
        assert [store.where(k) for k in keys] == ["device", "disk", "disk", "disk", "host"]
        disk = store.stats()["tiers"]["disk"]
        assert disk["dropped"] == 0 and disk["promotions"] == 1 and disk["blocks"] == 3
        store.put(BlockKey("s", 0, 5), block_for(BlockKey("s", 0, 5), **shape))  # now a real drop
        assert store.stats()["tiers"]["disk"]["dropped"] == 1 and store.where(keys[1]) is None


def test_a_directory_written_for_another_model_is_refused(tmp_path):
    directory = tmp_path / "disk"
    with TieredStore(disk_config(directory, fingerprint="model-a")) as store:
        store.put(BlockKey("s", 0, 0), block_for(BlockKey("s", 0, 0)))
    with pytest.raises(IdentityMismatch, match="fingerprint"):
        TieredStore(disk_config(directory, fingerprint="model-b"))
    with pytest.raises(IdentityMismatch, match="block_tokens"):
        TieredStore(disk_config(directory, fingerprint="model-a", block_tokens=32))
    with TieredStore(disk_config(directory, fingerprint="model-a")) as store:  # and nothing was left locked
        assert len(store) == 0  # the one block never left the device


@pytest.mark.parametrize("field, value, error", [
    ("disk_durability", "always", ValueError),
    ("disk_zstd_level", 0, ValueError),
    ("disk_zstd_level", 30, ValueError),
    ("disk_zstd_level", 1.0, TypeError),
    ("disk_zstd_threads", -2, ValueError),
    ("disk_segment_bytes", 0, ValueError),
    ("disk_compact_live_fraction", 1.5, ValueError),
    ("disk_compact_live_fraction", "half", TypeError),
    ("fingerprint", 7, TypeError),
    ("fingerprint", "two\nlines", ValueError),
])
def test_bad_disk_configuration_names_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        disk_config(tmp_path / "disk", **{field: value})
    assert not (tmp_path / "disk").exists()


def test_disk_blocks_are_a_miss_when_damaged(tmp_path):
    directory = tmp_path / "disk"
    keys = [BlockKey("seq", 0, i) for i in range(12)]
    with TieredStore(disk_config(directory)) as store:
        for key in keys:
            store.put(key, block_for(key))
        victim = next(k for k in keys if store.where(k) == "disk")
        name, offset, length = store._place.tiers[2].record_span(victim)
        with open(directory / name, "r+b") as f:
            f.seek(offset + length - 3)
            byte = f.read(1)
            f.seek(offset + length - 3)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert store.get(victim) is None and victim not in store
        assert store.stats()["misses"] == 1
        assert all(store.get(k).equal(block_for(k)) for k in keys if k != victim)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_disk_codec_flows_through_the_store(tmp_path, name):
    codec = make_codec(name)
    keys = [BlockKey("seq", 0, i) for i in range(12)]
    with TieredStore(disk_config(tmp_path / "disk", disk_codec=name)) as store:
        for key in keys:
            store.put(key, block_for(key))
        on_disk = [key for key in keys if store.where(key) == "disk"]
        assert len(on_disk) == 6
        for key in on_disk:  # what the disk codec keeps of the block, exactly
            assert store.get(key).equal(codec.decode(codec.encode(block_for(key)), "cpu"))
