"""DiskTier on real files: round trips, capacity by whole segments, compaction, the index snapshot,
the directory's identity, file safety, and bad input that changes nothing."""

from __future__ import annotations

import ast
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.tiered.disk_helpers import TOKENS, block_for, encoded_for, matches
from tiered import CODECS, BlockKey, Encoded, make_codec
from tiered.disk import DirectoryBusy, DiskTier, IdentityMismatch

SEGMENT_BYTES = 64 << 10


def open_tier(directory: Path, capacity_bytes: int = 64 << 20, **kwargs) -> DiskTier:
    kwargs.setdefault("segment_bytes", SEGMENT_BYTES)
    return DiskTier(directory, capacity_bytes, **kwargs)


def segment_files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("seg-*.log"))


def keys(n: int, namespace: str = "s", start: int = 0) -> list[BlockKey]:
    return [BlockKey(namespace, i % 3, i) for i in range(start, start + n)]


@pytest.mark.parametrize("durability", ["record", "segment", "never"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_exact_and_survives_reopen(tmp_path, durability, dtype):
    with_tokens = [(key, 1 + key.index % 16) for key in keys(30)]  # partial blocks too
    tier = open_tier(tmp_path, durability=durability)
    for key, tokens in with_tokens:
        assert tier.put(key, encoded_for(key, dtype=dtype, tokens=tokens)) == []
    for key, tokens in with_tokens:
        got = tier.get(key)
        assert matches(got, key, dtype=dtype, tokens=tokens)
        assert got.codec == "raw" and got.dtype == dtype and got.shape == (2, tokens, 32)
        assert tier.held(key) == (tier.charge(got), tokens)
    assert tier.used_bytes == segment_files_bytes(tmp_path) <= tier.capacity_bytes
    tier.close()
    tier = open_tier(tmp_path, durability=durability)
    try:
        assert tier.counters.opened_from_snapshot
        assert sorted(tier.keys(), key=repr) == sorted((k for k, _ in with_tokens), key=repr)
        assert all(matches(tier.get(key), key, dtype=dtype, tokens=tokens) for key, tokens in with_tokens)
    finally:
        tier.close()


def test_fp16_payloads_are_compressed_and_the_counters_add_up(tmp_path):
    tier = open_tier(tmp_path)
    try:
        for key in keys(20):
            tier.put(key, encoded_for(key))
        counters = tier.counters
        assert counters.records_written == 20
        assert counters.logical_bytes_written == 20 * 4096
        assert counters.stored_bytes_written < 0.95 * counters.logical_bytes_written  # byte-shuffle + zstd
    finally:
        tier.close()


def test_remove_and_put_again_serves_only_the_new_version(tmp_path):
    key = BlockKey("s", 0, 0)
    tier = open_tier(tmp_path)
    tier.put(key, encoded_for(key, 0))
    with pytest.raises(KeyError):
        tier.put(key, encoded_for(key, 1))
    assert tier.remove(key) and not tier.remove(key)
    assert tier.get(key) is None and key not in tier
    tier.put(key, encoded_for(key, 1))
    assert matches(tier.get(key), key, 1)
    tier.close()
    (tmp_path / "INDEX.snapshot").unlink()  # rebuild from the segments: the old record is marked dead
    tier = open_tier(tmp_path)
    try:
        assert list(tier.keys()) == [key] and matches(tier.get(key), key, 1)
    finally:
        tier.close()


def test_capacity_is_never_exceeded_and_whole_oldest_segments_go_first(tmp_path):
    capacity = 256 << 10
    tier = open_tier(tmp_path, capacity, compact_live_fraction=0)
    written: list[BlockKey] = []
    dropped_all: list[BlockKey] = []
    try:
        for key in keys(300):
            dropped = tier.put(key, encoded_for(key))
            written.append(key)
            dropped_all.extend(dropped)
            assert tier.used_bytes == segment_files_bytes(tmp_path) <= capacity
            assert not any(k in tier for k in dropped)
        assert dropped_all, "300 blocks of ~3.5 KiB cannot fit 256 KiB"
        assert dropped_all == written[: len(dropped_all)]  # oldest first, in whole segments
        survivors = written[len(dropped_all) :]
        assert sorted(tier.keys(), key=repr) == sorted(survivors, key=repr)
        assert all(matches(tier.get(key), key) for key in survivors)
        assert tier.counters.segments_evicted >= 2 and tier.counters.records_evicted == len(dropped_all)
    finally:
        tier.close()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sparse_segments_are_compacted_in_the_background(tmp_path):
    tier = open_tier(tmp_path, compact_live_fraction=0.5)
    try:
        all_keys = keys(200)
        for key in all_keys:
            tier.put(key, encoded_for(key))
        before = tier.used_bytes
        kept = all_keys[::4]
        for key in all_keys:
            if key not in kept:
                tier.remove(key)
        wait_for(lambda: tier.counters.segments_compacted >= 3)
        wait_for(lambda: tier.compact() == 0)  # nothing sparse is left
        assert tier.used_bytes < 0.6 * before
        # the accounting equals the files once the background compactor has finished its pass
        # (one in flight writes its new segment before it deletes the old ones)
        wait_for(lambda: tier.used_bytes == segment_files_bytes(tmp_path))
        assert tier.counters.records_compacted > 0
        assert sorted(tier.keys(), key=repr) == sorted(kept, key=repr)
        assert all(matches(tier.get(key), key) for key in kept)
    finally:
        tier.close()
    tier = open_tier(tmp_path)
    try:
        assert all(matches(tier.get(key), key) for key in kept) and len(tier) == len(kept)
    finally:
        tier.close()


def test_when_full_a_mostly_dead_segment_is_compacted_rather_than_live_data_evicted(tmp_path):
    capacity = 512 << 10
    tier = open_tier(tmp_path, capacity, compact_live_fraction=0.5)
    try:
        # leave the compaction to put's own room-making: a background pass between the removals
        # and the puts would move the live block into a newer segment that the puts then evict
        tier._log._compactor.stop()
        first = keys(60)
        for key in first:
            tier.put(key, encoded_for(key))
        for key in first[1:]:  # the oldest segments are now nearly dead; one old block stays live
            tier.remove(key)
        dropped = []
        for key in keys(120, start=1000):
            dropped += tier.put(key, encoded_for(key))
        assert first[0] not in dropped and matches(tier.get(first[0]), first[0])
        assert tier.counters.segments_compacted >= 1
    finally:
        tier.close()


def test_snapshot_that_no_longer_matches_the_segments_is_not_trusted(tmp_path):
    tier = open_tier(tmp_path)
    first = keys(40)
    for key in first:
        tier.put(key, encoded_for(key))
    tier.close()
    stale = (tmp_path / "INDEX.snapshot").read_bytes()
    tier = open_tier(tmp_path)
    for key in first[:30]:
        tier.remove(key)
    tier.compact(0.99)  # deletes segments the stale snapshot names
    later = keys(10, start=100)
    for key in later:
        tier.put(key, encoded_for(key))
    tier.close()
    (tmp_path / "INDEX.snapshot").write_bytes(stale)
    tier = open_tier(tmp_path)
    try:
        assert not tier.counters.opened_from_snapshot
        assert "segment" in tier.counters.snapshot_note
        assert sorted(tier.keys(), key=repr) == sorted(first[30:] + later, key=repr)
        assert all(matches(tier.get(key), key) for key in first[30:] + later)
    finally:
        tier.close()


def test_snapshot_entry_removed_after_the_snapshot_stays_removed(tmp_path):
    tier = open_tier(tmp_path)
    for key in keys(10):
        tier.put(key, encoded_for(key))
    tier.close()
    stale = (tmp_path / "INDEX.snapshot").read_bytes()
    tier = open_tier(tmp_path, compact_live_fraction=0)
    tier.remove(keys(10)[3])
    tier.close()
    (tmp_path / "INDEX.snapshot").write_bytes(stale)  # as if the process died before its close
    tier = open_tier(tmp_path)
    try:
        assert tier.counters.opened_from_snapshot
        assert keys(10)[3] not in tier and len(tier) == 9
    finally:
        tier.close()


def test_damaged_snapshot_falls_back_to_a_full_scan(tmp_path):
    tier = open_tier(tmp_path)
    for key in keys(10):
        tier.put(key, encoded_for(key))
    tier.close()
    data = bytearray((tmp_path / "INDEX.snapshot").read_bytes())
    data[len(data) // 2] ^= 0x04
    (tmp_path / "INDEX.snapshot").write_bytes(bytes(data))
    tier = open_tier(tmp_path)
    try:
        assert not tier.counters.opened_from_snapshot and "checksum" in tier.counters.snapshot_note
        assert all(matches(tier.get(key), key) for key in keys(10))
    finally:
        tier.close()


# -- identity ---------------------------------------------------------------------------------------


def test_another_fingerprint_block_size_or_codec_is_refused(tmp_path):
    open_tier(tmp_path, fingerprint="smollm2-135m:abc", block_tokens=16).close()
    for kwargs, field in [
        (dict(fingerprint="llama-8b:def", block_tokens=16), "fingerprint"),
        (dict(fingerprint="smollm2-135m:abc", block_tokens=32), "block_tokens"),
        (dict(fingerprint="smollm2-135m:abc", block_tokens=16, codec="int8"), "codec"),
    ]:
        with pytest.raises(IdentityMismatch, match=field):
            open_tier(tmp_path, **kwargs)
    open_tier(tmp_path, fingerprint="smollm2-135m:abc", block_tokens=16).close()  # the lock was released


def test_the_first_block_fixes_the_dtype(tmp_path):
    key = BlockKey("s", 0, 0)
    tier = open_tier(tmp_path)
    tier.put(key, encoded_for(key, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        tier.put(BlockKey("s", 0, 1), encoded_for(key, dtype=torch.float16))
    tier.close()
    tier = open_tier(tmp_path)
    try:
        assert tier.identity.dtype == "bfloat16"
        with pytest.raises(TypeError, match="bfloat16"):
            tier.put(BlockKey("s", 0, 1), encoded_for(key, dtype=torch.float32))
    finally:
        tier.close()


def test_a_directory_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a disk tier directory"):
        open_tier(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", "notes.txt"]


def test_a_damaged_manifest_is_refused_with_a_clear_error(tmp_path):
    open_tier(tmp_path).close()
    (tmp_path / "MANIFEST.json").write_text('{"format": "tiered-disk", "format_vers')
    with pytest.raises(ValueError, match="not a valid disk tier manifest"):
        open_tier(tmp_path)


def test_a_second_writer_is_refused_while_the_first_has_it_open(tmp_path):
    tier = open_tier(tmp_path)
    try:
        with pytest.raises(DirectoryBusy):
            open_tier(tmp_path)
    finally:
        tier.close()
    open_tier(tmp_path).close()


# -- safety -----------------------------------------------------------------------------------------


def test_directory_is_0700_and_files_0600_whatever_the_umask(tmp_path):
    directory = tmp_path / "a" / "disk"
    old = os.umask(0)
    try:
        tier = open_tier(directory)
        for key in keys(40):
            tier.put(key, encoded_for(key))
        tier.close()
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o700
    files = list(directory.iterdir())
    assert {p.name for p in files} >= {"MANIFEST.json", "INDEX.snapshot", "LOCK", "seg-0000000001.log"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)


def test_a_namespace_never_names_a_path(tmp_path):
    directory = tmp_path / "disk"
    tier = open_tier(directory)
    hostile = ["../escape", "/etc/passwd", "..", "a/../../b", "seg-0000000009.log", "INDEX.snapshot", "~root"]
    try:
        for i, namespace in enumerate(hostile):
            key = BlockKey(namespace, 0, i)
            tier.put(key, encoded_for(key))
        assert all(matches(tier.get(BlockKey(ns, 0, i)), BlockKey(ns, 0, i)) for i, ns in enumerate(hostile))
    finally:
        tier.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]
    assert sorted(p.name for p in directory.iterdir()) == ["INDEX.snapshot", "LOCK", "MANIFEST.json", "seg-0000000001.log"]


def test_the_disk_package_never_unpickles_or_torch_loads():
    source = Path(__file__).parents[2] / "tiered" / "disk"
    for path in source.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "marshal", "shelve", "dill"} & set(names), f"{path.name} imports {names}"
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "eval"):
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                assert owner not in ("torch", "np", "numpy", "pickle"), f"{path.name} calls {owner}.{node.attr}"
            if isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle", f"{path.name} passes allow_pickle"
            if isinstance(node, ast.Name):
                assert node.id not in ("eval", "exec"), f"{path.name} uses {node.id}"


# -- bad input changes nothing ----------------------------------------------------------------------


def test_bad_items_are_refused_and_leave_no_trace(tmp_path):
    tier = open_tier(tmp_path)
    key = BlockKey("s", 0, 0)
    good = encoded_for(key)
    bad_items = [
        (good.payload, TypeError),
        (Encoded("raw", torch.float16, (2, 16, 32), good.payload.view(torch.float16)), ValueError),
        (Encoded("raw", torch.float16, (2, 16, 32), good.payload.view(2, -1)), ValueError),
        (Encoded("raw", torch.float16, (2, 16, 32), torch.empty(0, dtype=torch.uint8)), ValueError),
        (Encoded("raw", torch.int8, (2, 16, 32), good.payload), TypeError),
        (Encoded("raw", torch.float16, (2, 0, 32), good.payload), ValueError),
        (Encoded("raw", torch.float16, [2, 16, 32], good.payload), ValueError),
        (Encoded("int8", torch.float16, (2, 16, 32), good.payload), ValueError),
    ]
    try:
        for item, error in bad_items:
            with pytest.raises(error):
                tier.put(key, item)
        with pytest.raises(ValueError, match="2\\*\\*32"):
            tier.put(BlockKey("s", 1 << 32, 0), good)
        with pytest.raises(TypeError):
            tier.put(("s", 0, 0), good)
        tiny = open_tier(tmp_path / "tiny", capacity_bytes=2048)
        with pytest.raises(ValueError, match="cannot fit"):
            tiny.put(key, good)
        tiny.close()
        assert len(tier) == 0 and tier.used_bytes == 0 and tier.counters.records_written == 0
        assert not list(tmp_path.glob("seg-*.log"))
        assert tier.identity.dtype is None  # refused items fix nothing either
    finally:
        tier.close()


@pytest.mark.parametrize("kwargs, error", [
    (dict(capacity_bytes=0), ValueError),
    (dict(capacity_bytes=1.5), TypeError),
    (dict(durability="sometimes"), ValueError),
    (dict(zstd_level=0), ValueError),
    (dict(zstd_level=23), ValueError),
    (dict(zstd_threads=-1), ValueError),
    (dict(compact_live_fraction=1.0), ValueError),
    (dict(codec=""), ValueError),
    (dict(fingerprint="a\nb"), ValueError),
    (dict(block_tokens=True), TypeError),
])
def test_bad_configuration_is_refused_before_touching_the_directory(tmp_path, kwargs, error):
    capacity = kwargs.pop("capacity_bytes", 1 << 20)
    with pytest.raises(error):
        DiskTier(tmp_path / "disk", capacity, **kwargs)
    assert not (tmp_path / "disk").exists()


def test_closed_tier_refuses_use(tmp_path):
    tier = open_tier(tmp_path)
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tier.get(BlockKey("s", 0, 0))
    with pytest.raises(RuntimeError, match="closed"):
        tier.put(BlockKey("s", 0, 0), encoded_for(BlockKey("s", 0, 0)))
    shutil.rmtree(tmp_path)


# -- every registered codec -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_codec_payload_comes_back_byte_for_byte(tmp_path, name, dtype):
    codec = make_codec(name)
    blocks = {key: block_for(key, dtype=dtype, tokens=TOKENS if key.index % 3 else 5) for key in keys(12)}
    tier = open_tier(tmp_path, codec=codec.spec)
    try:
        encoded = {key: codec.encode(block) for key, block in blocks.items()}
        for key, item in encoded.items():
            tier.put(key, item)
        tier.close()
        tier = open_tier(tmp_path, codec=codec.spec)
        for key, item in encoded.items():
            got = tier.get(key)
            assert (got.codec, got.dtype, got.shape) == (item.codec, item.dtype, item.shape)
            assert torch.equal(got.payload, item.payload)
            assert codec.decode(got, "cpu").equal(codec.decode(item, "cpu"))
    finally:
        tier.close()


@pytest.mark.parametrize("options, error, words", [
    (dict(capacity_bytes=0), ValueError, r"DiskTier: capacity_bytes must be > 0, got 0"),
    (dict(capacity_bytes="1MiB"), TypeError, r"DiskTier: capacity_bytes must be int, got '1MiB' \(str\)"),
    (dict(zstd_level=23), ValueError, r"DiskTier: zstd_level must be in \[1, 22\], got 23"),
    (dict(durability="always"), ValueError, r"DiskTier: durability must be one of \['record', 'segment', 'never'\]"),
    (dict(compact_live_fraction=1.0), ValueError, r"DiskTier: compact_live_fraction must be in \[0, 1\), got 1\.0"),
    (dict(directory=3), TypeError, r"DiskTier: directory must be a path, got 3 \(int\)"),
])
def test_bad_options_are_refused_naming_the_option_before_the_directory_is_touched(tmp_path, options, error, words):
    arguments = {"directory": tmp_path / "d", "capacity_bytes": 1 << 20, **options}
    with pytest.raises(error, match=words):
        DiskTier(**arguments)
    assert not (tmp_path / "d").exists()
