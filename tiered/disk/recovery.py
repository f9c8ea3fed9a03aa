"""Rebuilding the index on open: from the snapshot where it checks out, else by scanning every segment.

Fast path: every segment the snapshot names exists with the same uuid and at least the recorded
length, no unknown segment is older than the newest it names, and the header of every record it
lists still verifies and names the same key and seq (a record marked dead since was removed; it
is left out). Records appended after the snapshot are then scanned. Anything else, and a missing
or damaged snapshot, means a full scan that verifies every checksum of every record.

Either way the newest intact record of a key (highest seq) wins. A key whose newest record is
damaged is dropped rather than served an older one, and every record that lost is marked dead
(when writable), so that afterwards each key has exactly one live record on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..block import BlockKey
from .index import Index, Location
from .record import RecordError
from .segment import SEGMENT_HEADER, ScanItem, Segment
from .snapshot import Snapshot, SnapshotError, load_snapshot


@dataclass
class Recovered:
    """What recovery found: the index, the next seq to write, and the damage it saw."""

    index: Index
    next_seq: int
    max_segment_id: int
    from_snapshot: bool
    snapshot_note: str  # why the snapshot was not used ("" when it was)
    damaged: list[tuple[int, ScanItem]] = field(default_factory=list)  # (segment id, item)
    superseded: list[Location] = field(default_factory=list)  # live-marked records that lost


class _Builder:
    def __init__(self) -> None:
        self.index = Index()
        self.max_seq = 0
        self.damaged: list[tuple[int, ScanItem]] = []
        self.damaged_seq: dict[BlockKey, int] = {}
        self.superseded: list[Location] = []

    def add(self, key: BlockKey, loc: Location) -> None:
        self.max_seq = max(self.max_seq, loc.seq)
        loser = self.index.merge(key, loc)
        if loser is not None:
            self.superseded.append(loser)

    def scan(self, segment: Segment, start: int) -> None:
        for item in segment.scan(start=start, end=segment.end, verify_payload=True):
            header = item.header
            if header is not None:
                self.max_seq = max(self.max_seq, header.seq)
            if item.status == "live":
                self.add(header.key, Location(segment.id, item.offset, item.length, header.header_len, header.seq,
                                              header.raw_len, header.shape[1]))
            elif item.status == "damaged":
                self.damaged.append((segment.id, item))
                if header is not None:
                    self.damaged_seq[header.key] = max(header.seq, self.damaged_seq.get(header.key, 0))

    def finish(self, next_seq: int, max_segment_id: int, from_snapshot: bool, note: str) -> Recovered:
        for key, seq in self.damaged_seq.items():
            loc = self.index.get(key)
            if loc is not None and loc.seq < seq:  # never fall back to an older version
                self.superseded.append(self.index.pop(key))
        return Recovered(self.index, max(next_seq, self.max_seq + 1), max_segment_id, from_snapshot, note,
                         self.damaged, self.superseded)


def _from_snapshot(snap: Snapshot, segments: dict[int, Segment]) -> _Builder:
    named = {s.id: s for s in snap.segments}
    for s in snap.segments:
        seg = segments.get(s.id)
        if seg is None or seg.uuid != s.uuid or seg.end < s.end:
            raise SnapshotError(f"segment {s.id} is missing, replaced or shorter than the snapshot says")
    newest = max(named, default=0)
    for segment_id in segments:
        if segment_id not in named and segment_id < newest:
            raise SnapshotError(f"segment {segment_id} is not in the snapshot")
    builder = _Builder()
    builder.max_seq = snap.next_seq - 1
    for key, loc in snap.records:
        if loc.segment_id not in named or loc.offset + loc.length > named[loc.segment_id].end:
            raise SnapshotError(f"record of {key} lies outside its segment")
        try:
            header, dead = segments[loc.segment_id].read_header(loc.offset, loc.header_len)
        except RecordError as err:
            raise SnapshotError(f"record of {key} no longer verifies: {err.reason}") from None
        if (header.key, header.seq, header.length, header.raw_len, header.shape[1]) != (
                key, loc.seq, loc.length, loc.raw_len, loc.tokens):
            raise SnapshotError(f"record at segment {loc.segment_id} offset {loc.offset} differs from the snapshot")
        if dead:
            continue  # marked dead after the snapshot: removed or moved (a moved copy is scanned below)
        builder.add(key, loc)
    for segment_id, seg in sorted(segments.items()):
        builder.scan(seg, named[segment_id].end if segment_id in named else SEGMENT_HEADER.size)
    return builder


def recover(directory: Path, segments: dict[int, Segment]) -> Recovered:
    """The index of the records in `segments`, and what recovery found on the way."""
    max_id = max(segments, default=0)
    try:
        snap = load_snapshot(directory)
        builder = _from_snapshot(snap, segments)
        max_id = max([max_id, *(s.id for s in snap.segments)])
        return builder.finish(snap.next_seq, max_id, True, "")
    except SnapshotError as err:
        note = str(err)
    builder = _Builder()
    for _, seg in sorted(segments.items()):
        builder.scan(seg, SEGMENT_HEADER.size)
    return builder.finish(1, max_id, False, note)
