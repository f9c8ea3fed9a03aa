"""SegmentLog: records keyed by BlockKey in append-only segment files, within a byte budget.

Thread-safe: one lock guards the index, the segment table and appends; record bytes are read
outside it (a reader holds a reference on the segment, so an evicted or compacted segment stays
readable until the read is done). The space rules:

- the sum of segment file sizes never exceeds capacity_bytes: before an append, room is made
  by compacting a mostly-dead segment (when its live records fit) or else by evicting the
  oldest segment whole; the keys that left are returned to the caller of write;
- a segment seals when the next record would pass segment_bytes; sealed segments whose live
  fraction falls below compact_live_fraction are compacted by a background thread (their live
  records copied, verbatim, to the head segment, then the file deleted);
- remove flips the record's magic to DEAD in place, so no later scan revives it.

Durability: "record" fdatasyncs after every record and dead mark; "segment" (the default) when a
segment seals, before compaction deletes a segment, and on close; "never" leaves it to the OS.
A process that is killed loses nothing that write returned from in any mode; a power loss may lose
the records not yet synced, which then read as misses.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..block import BlockKey
from .compaction import Compactor
from .counters import DiskCounters
from .files import fsync_dir
from .index import Index, Location
from .record import RecordError, RecordHeader, pack_header, parse_record
from .recovery import recover
from .segment import SEGMENT_HEADER, SEGMENT_NAME, Segment
from .snapshot import SnapshotSegment, write_snapshot

DURABILITY_MODES = ("record", "segment", "never")
READ_ATTEMPTS = 3  # a read that loses a race with compaction looks the key up again


class SegmentLog:
    """The records of one directory. See the module docstring for the rules."""

    def __init__(self, directory: Path, capacity_bytes: int, segment_bytes: int, durability: str,
                 compact_live_fraction: float) -> None:
        self.directory = directory
        self.capacity_bytes = capacity_bytes
        self.segment_bytes = segment_bytes
        self.durability = durability
        self.compact_live_fraction = compact_live_fraction
        self.counters = DiskCounters()
        self._lock = threading.RLock()
        self._segments: dict[int, Segment] = {}
        self._head: Segment | None = None
        self._index = Index()
        self._next_seq = 1
        self._next_segment_id = 1
        self._used_bytes = 0
        self._unreported: set[BlockKey] = set()  # dropped while a write failed; reported by the next write
        self._closed = False
        self._compactor: Compactor | None = None

    # -- open and close ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open every segment in the directory, rebuild the index, start the compactor."""
        try:
            for path in sorted(self.directory.iterdir()):
                match = SEGMENT_NAME.match(path.name)
                if match:
                    segment = Segment.open(path, int(match.group(1)), writable=True)
                    self._segments[segment.id] = segment
                    self._used_bytes += segment.end
            found = recover(self.directory, self._segments)
            for loc in found.superseded:  # at most one live-marked record per key from now on
                self._segments[loc.segment_id].mark_dead(loc.offset)
        except BaseException:
            for segment in self._segments.values():
                segment.close()
            raise
        self._index = found.index
        self._next_seq = found.next_seq
        self._next_segment_id = found.max_segment_id + 1
        self.counters.damaged_records += len(found.damaged)
        self.counters.opened_from_snapshot = found.from_snapshot
        self.counters.snapshot_note = found.snapshot_note
        if self.compact_live_fraction > 0:
            self._compactor = Compactor(self)
            self._compactor.start()
            self._compactor.wake()  # segments left sparse by an earlier run

    def close(self) -> None:
        """Stop compaction, sync, write the index snapshot, close the files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._compactor is not None:
            self._compactor.stop()
        with self._lock:
            if self._head is not None and self.durability != "never":
                self._head.sync()
            segments = [SnapshotSegment(s.id, s.uuid, s.end) for s in self._segments.values() if s.uuid is not None]
            try:
                write_snapshot(self.directory, self._next_seq, segments, self._index)
            except OSError as err:  # the next open scans the segments instead
                self.counters.write_errors += 1
                self.counters.last_error = f"index snapshot not written: {err}"
            for segment in self._segments.values():
                segment.close()

    def sync(self) -> None:
        """Make every record written so far durable (unless durability is "never")."""
        with self._lock:
            self._check_open()
            if self._head is not None and self.durability != "never":
                self._head.sync()

    # -- queries ----------------------------------------------------------------------------------

    def __contains__(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def keys(self) -> list[BlockKey]:
        with self._lock:
            return list(self._index)

    def location(self, key: BlockKey) -> Location | None:
        with self._lock:
            return self._index.get(key)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used_bytes

    def segment_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._segments)

    # -- write, read, remove ----------------------------------------------------------------------

    def write(self, header: RecordHeader, buffers: list) -> list[BlockKey]:
        """Append a record for header.key (its seq is assigned here); the keys dropped to make room.

        KeyError if the key is stored; ValueError if the record cannot fit even an empty log;
        OSError (ENOSPC...) if the write fails, and then no record of it exists.
        """
        key = header.key
        with self._lock:
            self._check_open()
            if key in self._index:
                raise KeyError(f"{key} is already in the disk tier")
            packed = pack_header(header, seq=self._next_seq)
            length = len(packed) + header.stored_len
            if length + SEGMENT_HEADER.size > self.capacity_bytes:
                raise ValueError(f"a record of {length} bytes cannot fit disk_bytes={self.capacity_bytes}")
            dropped = self._make_room(length)
            try:
                segment, offset = self._append([packed, *buffers], length)
            except OSError:
                self._unreported.update(dropped)
                self.counters.write_errors += 1
                raise
            self._index.put(key, Location(segment.id, offset, length, len(packed), self._next_seq, header.raw_len,
                                          header.shape[1]))
            self._next_seq += 1
            self.counters.records_written += 1
            self.counters.logical_bytes_written += header.raw_len
            self.counters.stored_bytes_written += length
            self._unreported.discard(key)
            dropped.extend(self._unreported)
            self._unreported.clear()
            return dropped

    def read(self, key: BlockKey) -> tuple[RecordHeader, memoryview, Location] | None:
        """The verified header, stored payload and location of `key`'s record, or None (absent or damaged)."""
        for _ in range(READ_ATTEMPTS):
            with self._lock:
                self._check_open()
                loc = self._index.get(key)
                if loc is None:
                    return None
                segment = self._segments[loc.segment_id]
                segment.acquire()
            try:
                data = segment.read(loc.offset, loc.length)
            finally:
                with self._lock:
                    segment.release()
            try:
                header, payload = parse_record(data)
                if header.key != key or header.seq != loc.seq or len(data) != loc.length:
                    raise RecordError("record does not match the index")
                with self._lock:
                    self.counters.reads += 1
                return header, payload, loc
            except RecordError:
                with self._lock:
                    if self._index.get(key) == loc:  # not moved or removed meanwhile: real damage
                        self.drop_damaged(key, loc)
                        return None
        return None

    def drop_damaged(self, key: BlockKey, loc: Location) -> None:
        """Forget `key`, whose record at `loc` was found damaged (no-op if it has moved since)."""
        with self._lock:
            if self._index.get(key) == loc:
                self._index.pop(key)
                self.counters.damaged_records += 1

    def remove(self, key: BlockKey) -> bool:
        with self._lock:
            self._check_open()
            self._unreported.discard(key)
            loc = self._index.pop(key)
            if loc is None:
                return False
            segment = self._segments[loc.segment_id]
            try:
                segment.mark_dead(loc.offset)
                if self.durability == "record":
                    segment.sync()
            except OSError as err:  # the record may come back after a restart; the store loses nothing
                self.counters.write_errors += 1
                self.counters.last_error = f"dead mark not written: {err}"
            self._wake_if_sparse(segment)
            return True

    # -- space (lock held) ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the disk tier is closed")

    def _cost(self, length: int) -> int:
        """Bytes appending `length` bytes takes, counting a new segment's header if it rolls."""
        head = self._head
        if head is None or (head.end + length > self.segment_bytes and head.end > SEGMENT_HEADER.size):
            return length + SEGMENT_HEADER.size
        return length

    def _append(self, buffers: list, length: int) -> tuple[Segment, int]:
        if self._cost(length) != length:
            self._roll()
        segment = self._head
        offset = segment.append(buffers, length)
        self._used_bytes += length
        if self.durability == "record":
            try:
                segment.sync()
            except OSError:  # not known to be durable: make sure it never comes back, and say so
                segment.mark_dead(offset)
                raise
        return segment, offset

    def _roll(self) -> None:
        old = self._head
        if old is not None:
            old.sealed = True
            if self.durability != "never":
                old.sync()
            self._head = None
            self._wake_if_sparse(old)
        segment = Segment.create(self.directory, self._next_segment_id)
        self._next_segment_id += 1
        self._segments[segment.id] = segment
        self._head = segment
        self._used_bytes += segment.end
        self.counters.segments_created += 1
        if self.durability != "never":
            fsync_dir(self.directory)

    def _make_room(self, length: int) -> list[BlockKey]:
        dropped: list[BlockKey] = []
        while self._used_bytes + self._cost(length) > self.capacity_bytes:
            # the live records of a compacted segment are copied before it goes: they must fit in
            # what is free now (the record to be written waits until the segment is gone)
            candidate = self._sparse_segment(self.capacity_bytes - self._used_bytes)
            if candidate is not None and self.compact_segment(candidate):
                continue
            dropped.extend(self._evict(self._segments[min(self._segments)]))
        return dropped

    def _evict(self, segment: Segment) -> list[BlockKey]:
        keys = self._index.drop_segment(segment.id)
        self._delete(segment)
        self.counters.segments_evicted += 1
        self.counters.records_evicted += len(keys)
        return keys

    def _delete(self, segment: Segment) -> None:
        del self._segments[segment.id]
        self._used_bytes -= segment.end
        if segment is self._head:
            self._head = None
        segment.retire()
        if self.durability != "never":
            try:
                fsync_dir(self.directory)
            except OSError as err:  # the unlink may not be durable yet; nothing is lost by that
                self.counters.write_errors += 1
                self.counters.last_error = f"directory fsync failed: {err}"

    def _is_sparse(self, segment: Segment, live_fraction: float) -> bool:
        if not segment.sealed or segment.retired or segment.compacting or segment is self._head:
            return False
        body = segment.end - SEGMENT_HEADER.size
        live = self._index.live_bytes(segment.id)
        return live < live_fraction * body and segment.end - live > 2 * SEGMENT_HEADER.size

    def _sparse_segment(self, spare_bytes: int) -> Segment | None:
        """A sealed, mostly dead segment whose live records fit in `spare_bytes`, least live first."""
        if self.compact_live_fraction <= 0:
            return None
        fits = [s for s in self._segments.values() if self._is_sparse(s, self.compact_live_fraction)
                and self._index.live_bytes(s.id) + SEGMENT_HEADER.size <= spare_bytes]
        return min(fits, key=lambda s: self._index.live_bytes(s.id), default=None)

    def _wake_if_sparse(self, segment: Segment) -> None:
        if self._compactor is not None and self._is_sparse(segment, self.compact_live_fraction):
            self._compactor.wake()

    # -- compaction -------------------------------------------------------------------------------

    def compact(self, live_fraction: float | None = None) -> int:
        """Compact every sealed segment whose live fraction is below `live_fraction` (default: the
        configured one) and whose live records fit; the number of segments deleted. Thread-safe."""
        live_fraction = self.compact_live_fraction if live_fraction is None else live_fraction
        done = 0
        while True:
            with self._lock:
                if self._closed:
                    return done
                candidates = [s for s in self._segments.values() if self._is_sparse(s, live_fraction)]
            progressed = sum(self.compact_segment(s) for s in candidates)
            done += progressed
            if not progressed:
                return done

    def compact_segment(self, segment: Segment) -> bool:
        """Copy `segment`'s live records to the head, then delete it; False if it stays (no room,
        a write failed, or it went away meanwhile). Reads happen outside the lock."""
        with self._lock:
            if self._closed or segment.compacting or segment.retired or segment is self._head or not segment.sealed:
                return False
            segment.compacting = True
            segment.acquire()
            entries = self._index.in_segment(segment.id)
        try:
            for key, loc in entries:
                data = segment.read(loc.offset, loc.length)
                try:
                    header, _ = parse_record(data)
                    intact = header.key == key and header.seq == loc.seq
                except RecordError:
                    intact = False
                with self._lock:
                    if self._closed or segment.retired:
                        return False
                    if self._index.get(key) != loc:
                        continue  # removed, evicted or moved meanwhile
                    if not intact:
                        self.drop_damaged(key, loc)
                        continue
                    if self._used_bytes + self._cost(loc.length) > self.capacity_bytes:
                        return False
                    try:
                        target, offset = self._append([data], loc.length)
                        segment.mark_dead(loc.offset)
                    except OSError as err:
                        self.counters.write_errors += 1
                        self.counters.last_error = f"compaction stopped: {err}"
                        return False
                    self._index.put(key, loc._replace(segment_id=target.id, offset=offset))
                    self.counters.records_compacted += 1
            with self._lock:
                if self._closed or segment.retired or self._index.in_segment(segment.id):
                    return False
                if self._head is not None and self.durability != "never":
                    self._head.sync()  # the copies are durable before the original goes
                self._delete(segment)
                self.counters.segments_compacted += 1
                return True
        finally:
            with self._lock:
                segment.compacting = False
                segment.release()
