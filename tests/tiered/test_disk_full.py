"""A full disk: put reports ENOSPC, nothing earlier is lost, and writing works again once space returns.

The first test uses a small real filesystem (a 1 MiB tmpfs) where the machine lets us mount one,
and an OSError(ENOSPC) injected at the write call otherwise; the second always injects, to fail
a write halfway through a record.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.tiered.disk_helpers import encoded_for, matches
from tiered import BlockKey
from tiered.disk import DiskTier
from tiered.disk import segment as segment_module

CAPACITY_BYTES = 64 << 20  # far above the filesystem: the filesystem is what runs out


class InjectedFull:
    """os.pwritev in the segment module fails with ENOSPC while `full`, after writing `partial` bytes."""

    def __init__(self, monkeypatch, partial: int = 0) -> None:
        self.full = False
        self.partial = partial
        real = os.pwritev

        def pwritev(fd, buffers, offset):
            if self.full:
                if self.partial:
                    os.pwrite(fd, bytes(memoryview(buffers[0]).cast("B"))[: self.partial], offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, buffers, offset)

        monkeypatch.setattr(segment_module.os, "pwritev", pwritev)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


class TmpfsFull:
    """A 1 MiB tmpfs, a third of it taken by a filler file that free() deletes."""

    def __init__(self, mountpoint: Path) -> None:
        self.filler = mountpoint / "filler"
        self.filler.write_bytes(b"\0" * (320 << 10))

    def fill(self) -> None:  # the puts themselves fill it up
        pass

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(directory for the tier, the full-disk control, "tmpfs" or "injected")."""
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no mount(8), or not allowed to run it
        mounted = False
    try:
        if mounted:
            yield mountpoint / "disk", TmpfsFull(mountpoint), "tmpfs"
        else:
            yield tmp_path / "disk", InjectedFull(monkeypatch), "injected"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill_until_enospc(tier: DiskTier, full, limit: int = 2000) -> tuple[list[BlockKey], BlockKey]:
    written = []
    for i in range(limit):
        if i == 40:
            full.fill()
        key = BlockKey("s", i % 2, i)
        try:
            tier.put(key, encoded_for(key))
        except OSError as err:
            assert err.errno == errno.ENOSPC
            return written, key
        written.append(key)
    raise AssertionError("the disk never filled up")


def segment_files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("seg-*.log"))


def test_enospc_is_reported_earlier_blocks_stay_and_writes_resume(small_disk):
    directory, full, kind = small_disk
    tier = DiskTier(directory, CAPACITY_BYTES, segment_bytes=64 << 10)
    try:
        written, failed = fill_until_enospc(tier, full)
        assert len(written) >= 40, kind
        assert failed not in tier and tier.get(failed) is None
        assert all(matches(tier.get(key), key) for key in written)
        assert tier.used_bytes == segment_files_bytes(directory)  # the failed record left no bytes behind
        assert tier.counters.write_errors >= 1
        with pytest.raises(OSError):  # still full: still refused, still nothing lost
            tier.put(failed, encoded_for(failed))
        assert all(matches(tier.get(key), key) for key in written)
        full.free()
        more = [failed] + [BlockKey("t", 0, i) for i in range(10)]
        for key in more:
            assert tier.put(key, encoded_for(key)) == []
        assert all(matches(tier.get(key), key) for key in written + more)
    finally:
        tier.close()
    tier = DiskTier(directory, CAPACITY_BYTES, segment_bytes=64 << 10)
    try:
        assert len(tier) == len(written + more) and tier.counters.damaged_records == 0
        assert all(matches(tier.get(key), key) for key in written + more)
    finally:
        tier.close()


def test_a_write_that_fails_halfway_leaves_no_torn_record(tmp_path, monkeypatch):
    full = InjectedFull(monkeypatch, partial=100)  # 100 bytes of the header land, then ENOSPC
    directory = tmp_path / "disk"
    tier = DiskTier(directory, CAPACITY_BYTES, segment_bytes=64 << 10)
    try:
        written, failed = fill_until_enospc(tier, full)
        assert tier.used_bytes == segment_files_bytes(directory)  # truncated back
        full.free()
        tier.put(failed, encoded_for(failed))
        assert all(matches(tier.get(key), key) for key in written + [failed])
    finally:
        tier.close()
    tier = DiskTier(directory, CAPACITY_BYTES, segment_bytes=64 << 10)
    try:
        assert tier.counters.damaged_records == 0 and len(tier) == len(written) + 1
    finally:
        tier.close()
