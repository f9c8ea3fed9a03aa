"""Corruption: random bit flips and truncations of segment files. Every damaged record is a miss
and a counter, every other block reads back exact, and `tiered inspect --verify` reports it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from runtime.cli import main as cli_main
from tests.tiered.disk_helpers import encoded_for, matches
from tiered import BlockKey
from tiered.disk import DiskTier, inspect_dir
from tiered.disk.segment import SEGMENT_HEADER

SEGMENT_BYTES = 64 << 10
TRIALS = 12


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict[BlockKey, tuple[str, int, int]]]:
    """A closed directory of ~150 live records (and some dead ones) over several segments, and
    where each live record lies."""
    directory = tmp_path_factory.mktemp("pristine")
    tier = DiskTier(directory, 64 << 20, segment_bytes=SEGMENT_BYTES, compact_live_fraction=0)
    all_keys = [BlockKey(f"s{i % 5}", i % 7, i) for i in range(200)]
    for key in all_keys:
        tier.put(key, encoded_for(key))
    for key in all_keys[::4]:
        tier.remove(key)
    spans = {key: tier.record_span(key) for key in tier.keys()}
    tier.close()
    assert len({span[0] for span in spans.values()}) >= 4
    return directory, spans


def damage(directory: Path, rng: random.Random) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Flip bits at random offsets of random segments, and truncate one now and then.

    Returns the flipped (file, offset)s and the truncated {file: new length}.
    """
    files = sorted(p.name for p in directory.glob("seg-*.log"))
    flips, cuts = [], {}
    for _ in range(rng.randint(1, 6)):
        name = rng.choice(files)
        data = bytearray((directory / name).read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 1 << rng.randrange(8)
        (directory / name).write_bytes(bytes(data))
        flips.append((name, offset))
    if rng.random() < 0.5:
        name = rng.choice(files)
        size = (directory / name).stat().st_size
        cuts[name] = rng.randrange(size)
        with open(directory / name, "r+b") as f:
            f.truncate(cuts[name])
    return flips, cuts


def hit(span: tuple[str, int, int], flips: list[tuple[str, int]], cuts: dict[str, int]) -> bool:
    name, offset, length = span
    if name in cuts and offset + length > cuts[name]:
        return True
    return any(f == name and offset <= o < offset + length for f, o in flips)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_damaged_records_are_misses_never_wrong_data(pristine, tmp_path, trial, capsys):
    source, spans = pristine
    directory = tmp_path / "disk"
    shutil.copytree(source, directory)
    rng = random.Random(trial)
    if trial % 2:
        (directory / "INDEX.snapshot").unlink()  # half the trials rebuild by scanning, half trust-but-verify
    flips, cuts = damage(directory, rng)
    damaged = {key for key, span in spans.items() if hit(span, flips, cuts)}

    # inspect --verify sees every flipped byte that still lies in the file (outside segment headers)
    report = inspect_dir(directory, verify=True)
    for name, offset in flips:
        if offset >= cuts.get(name, offset + 1) or offset < SEGMENT_HEADER.size:
            continue
        assert any(d.file == name and d.offset <= offset < d.offset + d.length for d in report.damaged), \
            f"the flip at {name}:{offset} was not reported"
    for name, offset in flips:
        if offset < SEGMENT_HEADER.size and offset < cuts.get(name, offset + 1):
            assert not next(s for s in report.segments if s.file == name).header_ok
    if damaged:
        assert cli_main(["inspect", str(directory), "--verify"]) == 1
        out = capsys.readouterr().out
        assert "damaged:" in out and f"{len(report.damaged)} damaged stretches found" in out

    tier = DiskTier(directory, 64 << 20, segment_bytes=SEGMENT_BYTES)
    try:
        for key in spans:
            got = tier.get(key)
            if key in damaged:
                assert got is None, f"{key} was damaged but served"
            else:
                assert matches(got, key), f"{key} was not damaged but did not read back exact"
        assert set(tier.keys()) == set(spans) - damaged  # damaged keys were forgotten
        if damaged:
            assert tier.counters.damaged_records >= 1
        # the tier keeps working on a damaged directory
        fresh = BlockKey("after", 0, trial)
        tier.put(fresh, encoded_for(fresh))
        assert matches(tier.get(fresh), fresh)
    finally:
        tier.close()


def test_every_damaged_record_is_counted_once_it_is_read(pristine, tmp_path):
    source, spans = pristine
    directory = tmp_path / "disk"
    shutil.copytree(source, directory)
    victims = sorted(spans, key=repr)[:10]
    for key in victims:  # one flipped payload byte each, the headers intact: the snapshot still verifies
        name, offset, length = spans[key]
        data = bytearray((directory / name).read_bytes())
        data[offset + length - 1] ^= 0x20
        (directory / name).write_bytes(bytes(data))
    tier = DiskTier(directory, 64 << 20, segment_bytes=SEGMENT_BYTES)
    try:
        assert tier.counters.opened_from_snapshot and tier.counters.damaged_records == 0
        assert all(tier.get(key) is None for key in victims)
        assert tier.counters.damaged_records == len(victims)
        assert all(matches(tier.get(key), key) for key in spans if key not in victims)
    finally:
        tier.close()
    report = inspect_dir(directory, verify=True)
    assert sorted((d.key for d in report.damaged), key=repr) == victims
    assert all(d.reason == "payload checksum mismatch" for d in report.damaged)
    assert inspect_dir(directory, verify=False).damaged == []  # headers alone look fine


def test_inspect_lists_a_healthy_directory(pristine, capsys):
    source, spans = pristine
    report = inspect_dir(source, verify=True)
    assert report.live_records == len(spans) and report.dead_records == 50 and report.damaged == []
    assert 1.05 < report.compression_ratio < 2
    assert report.snapshot == "verifies"
    assert cli_main(["inspect", str(source), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{len(spans)} live and 50 dead records" in out and "every checksum matches" in out
    assert cli_main(["inspect", str(source / "nope")]) == 2
