"""Listing and verifying a disk tier directory without changing it (what `tiered inspect` prints).

Read-only: it takes no lock and writes nothing, so it may run while a store has the directory
open (a record being appended at that moment shows as a torn tail).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..block import BlockKey
from .manifest import Identity, read_manifest
from .segment import SEGMENT_HEADER, SEGMENT_NAME, Segment
from .snapshot import SnapshotError, load_snapshot


@dataclass(frozen=True, slots=True)
class Damage:
    """A damaged or torn stretch of a segment file."""

    file: str
    offset: int
    length: int
    reason: str
    key: BlockKey | None  # known when the header verified but the payload did not


@dataclass(slots=True)
class SegmentReport:
    id: int
    file: str
    file_bytes: int
    header_ok: bool
    live_records: int = 0  # the current record of its key
    dead_records: int = 0  # removed, moved, or superseded by a newer record of the same key
    live_stored_bytes: int = 0  # stored payload bytes of live records
    live_logical_bytes: int = 0  # their payload bytes before compression
    damaged: list[Damage] = field(default_factory=list)


@dataclass(slots=True)
class DirReport:
    directory: Path
    identity: Identity
    verified: bool  # payload checksums were checked (otherwise headers only)
    snapshot: str  # "verifies", "absent", or what is wrong with it
    segments: list[SegmentReport]

    @property
    def damaged(self) -> list[Damage]:
        return [d for s in self.segments for d in s.damaged]

    @property
    def file_bytes(self) -> int:
        return sum(s.file_bytes for s in self.segments)

    @property
    def live_records(self) -> int:
        return sum(s.live_records for s in self.segments)

    @property
    def dead_records(self) -> int:
        return sum(s.dead_records for s in self.segments)

    @property
    def compression_ratio(self) -> float | None:
        """Payload bytes before compression / after, over live records; None without any."""
        stored = sum(s.live_stored_bytes for s in self.segments)
        return sum(s.live_logical_bytes for s in self.segments) / stored if stored else None


def inspect_dir(directory: str | Path, verify: bool = False) -> DirReport:
    """Segments, live and dead records, bytes and compression of a disk tier directory; with
    `verify`, every payload checksum is checked too. ValueError if it is not such a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    identity = read_manifest(directory)
    if identity is None:
        raise ValueError(f"{directory} has no disk tier manifest; it is not a disk tier directory")
    try:
        load_snapshot(directory)
        snapshot = "verifies"
    except SnapshotError as err:
        snapshot = "absent" if str(err) == "no snapshot" else str(err)
    reports: list[SegmentReport] = []
    newest: dict[BlockKey, tuple[int, SegmentReport, int, int]] = {}  # key -> (seq, report, stored, raw)
    for path in sorted(directory.iterdir()):
        match = SEGMENT_NAME.match(path.name)
        if not match:
            continue
        try:
            segment = Segment.open(path, int(match.group(1)), writable=False)
        except FileNotFoundError:  # compacted or evicted by a writer since the listing
            continue
        try:
            report = SegmentReport(segment.id, path.name, segment.end, segment.uuid is not None)
            reports.append(report)
            for item in segment.scan(SEGMENT_HEADER.size, segment.end, verify_payload=verify, verify_dead=verify):
                if item.status == "damaged":
                    key = item.header.key if item.header is not None else None
                    report.damaged.append(Damage(path.name, item.offset, item.length, item.reason, key))
                elif item.status == "dead":
                    report.dead_records += 1
                else:
                    header = item.header
                    entry = (header.seq, report, header.stored_len, header.raw_len)
                    old = newest.get(header.key)
                    if old is not None and old[0] >= header.seq:
                        report.dead_records += 1
                        continue
                    if old is not None:
                        old[1].dead_records += 1
                    newest[header.key] = entry
        finally:
            segment.close()
    for _, report, stored, raw in newest.values():
        report.live_records += 1
        report.live_stored_bytes += stored
        report.live_logical_bytes += raw
    return DirReport(directory, identity, verify, snapshot, reports)
