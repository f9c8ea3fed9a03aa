"""Segment files: a short header, then records appended one after another.

A segment is written only at its end (and a record's magic may be flipped to DEAD in place);
it is read with pread, so any number of threads read it while one appends. A segment that is
evicted or compacted away is unlinked at once, and its descriptor closed when its last reader
releases it. Reference counts and flags are changed with the owning tier's lock held.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .files import create_file, pread_exact, pread_into
from .record import DEAD_MAGIC, FIXED, LIVE_MAGIC, RecordError, RecordHeader, parse_fixed, parse_header, payload_checksum

SEGMENT_MAGIC = b"TKVS"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<4sHHQ16sQ")  # magic, version, reserved, id, uuid, xxh3-64 of the rest
SEGMENT_NAME = re.compile(r"^seg-(\d{10})\.log$")
RESYNC_CHUNK_BYTES = 1 << 20


def segment_name(segment_id: int) -> str:
    return f"seg-{segment_id:010d}.log"


@dataclass(frozen=True, slots=True)
class ScanItem:
    """One stretch of a segment: a live record, a dead one, or damage (header None if unreadable)."""

    offset: int
    length: int
    status: str  # "live" | "dead" | "damaged"
    header: RecordHeader | None
    reason: str = ""


class Segment:
    """One segment file, open for reading (and appending, if writable)."""

    def __init__(self, path: Path, segment_id: int, fd: int, seg_uuid: bytes | None, end: int, writable: bool) -> None:
        self.path = path
        self.id = segment_id
        self.fd = fd
        self.uuid = seg_uuid  # None when the segment header is damaged
        self.end = end  # bytes in the file as this process knows it; appends go here
        self.sealed = not writable  # no more appends
        self.retired = False  # unlinked; the fd closes with its last reader
        self.compacting = False
        self._closing = False
        self._refs = 0

    @classmethod
    def create(cls, directory: Path, segment_id: int) -> Segment:
        """A new, empty segment with a fresh uuid; on failure nothing is left behind."""
        path = directory / segment_name(segment_id)
        seg_uuid = uuid.uuid4().bytes
        head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, segment_id, seg_uuid, 0)
        head = head[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:-8]))
        fd = create_file(path)
        try:
            if os.pwrite(fd, head, 0) != len(head):
                raise OSError(f"short write creating {path}")
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, segment_id, fd, seg_uuid, len(head), writable=True)

    @classmethod
    def open(cls, path: Path, segment_id: int, writable: bool) -> Segment:
        """An existing segment. Its end is the file size; it is sealed (never appended to again)."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        head = pread_exact(fd, SEGMENT_HEADER.size, 0)
        seg_uuid = None
        if len(head) == SEGMENT_HEADER.size:
            magic, version, _, head_id, head_uuid, checksum = SEGMENT_HEADER.unpack(head)
            if (magic, version, head_id) == (SEGMENT_MAGIC, SEGMENT_VERSION, segment_id) and checksum == xxhash.xxh3_64_intdigest(head[:-8]):
                seg_uuid = head_uuid
        segment = cls(path, segment_id, fd, seg_uuid, size, writable)
        segment.sealed = True
        return segment

    # -- writing (the tier's lock held) ----------------------------------------------------------

    def append(self, buffers: list, length: int) -> int:
        """Write `buffers` (`length` bytes in all) at the end; their offset.

        On an error the file is truncated back to where it ended and the error propagates.
        """
        offset = self.end
        try:
            written = os.pwritev(self.fd, buffers, offset)
            while written < length:  # a short write: finish it, or fail with the reason
                rest = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[written:]
                more = os.pwrite(self.fd, rest, offset + written)
                if more == 0:
                    raise OSError(f"no progress writing {self.path}")
                written += more
        except OSError:
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                pass  # the bytes past `end` read as a torn tail; appends overwrite them
            raise
        self.end = offset + length
        return offset

    def mark_dead(self, offset: int) -> None:
        """Flip the magic of the record at `offset` to DEAD, so no scan takes it for live."""
        if not self.retired:
            os.pwrite(self.fd, DEAD_MAGIC, offset)

    def sync(self) -> None:
        if not self.retired and self.fd >= 0:
            os.fdatasync(self.fd)

    # -- lifetime (the tier's lock held) ---------------------------------------------------------

    def acquire(self) -> None:
        self._refs += 1

    def release(self) -> None:
        self._refs -= 1
        self._close_if_unused()

    def retire(self) -> None:
        """Unlink the file now; close it once no reader holds it."""
        if not self.retired:
            self.retired = True
            self.sealed = True
            self.path.unlink(missing_ok=True)
            self._close_if_unused()

    def close(self) -> None:
        self._closing = True
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self._refs == 0 and (self.retired or self._closing) and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading (no lock needed while a reference is held) -------------------------------------

    def read(self, offset: int, length: int) -> bytearray:
        """`length` bytes at `offset` (fewer at the end of the file), in a buffer the caller owns."""
        return pread_into(self.fd, length, offset)

    def read_header(self, offset: int, header_len: int) -> tuple[RecordHeader, bool]:
        """The verified header of the record at `offset`, and whether it is marked dead; RecordError otherwise."""
        buf = pread_exact(self.fd, header_len, offset)
        fixed = parse_fixed(buf)
        if fixed.header_len != header_len:
            raise RecordError("header length differs from the expected one")
        return parse_header(fixed, buf), fixed.dead

    def scan(self, start: int = SEGMENT_HEADER.size, end: int | None = None, verify_payload: bool = True,
             verify_dead: bool = False) -> Iterator[ScanItem]:
        """Every record and damaged stretch from `start` to `end` (the file size by default).

        Payload checksums are checked with `verify_payload` (of dead records too with `verify_dead`).
        A record with a verified header and a bad payload is reported damaged with its header;
        an unreadable header is skipped by searching for the next header that verifies.
        """
        end = os.fstat(self.fd).st_size if end is None else end
        pos = start
        while pos < end:
            buf = pread_exact(self.fd, min(FIXED.size, end - pos), pos)
            header = None
            try:
                fixed = parse_fixed(buf)
                buf += pread_exact(self.fd, min(fixed.var_len, end - pos - len(buf)), pos + FIXED.size)
                header = parse_header(fixed, buf)
                if pos + fixed.length > end:
                    raise RecordError("torn: payload cut short by the end of the file")
                if verify_payload and (verify_dead or not fixed.dead):
                    payload = pread_exact(self.fd, fixed.stored_len, pos + fixed.header_len)
                    if payload_checksum(payload) != header.payload_sum:
                        raise RecordError("payload checksum mismatch")
            except RecordError as err:
                if header is not None and pos + fixed.length <= end:  # the header vouches for the length
                    yield ScanItem(pos, fixed.length, "damaged", header, err.reason)
                    pos += fixed.length
                    continue
                nxt = self._next_header(pos + 1, end)
                yield ScanItem(pos, (end if nxt is None else nxt) - pos, "damaged", header, err.reason)
                if nxt is None:
                    return
                pos = nxt
                continue
            yield ScanItem(pos, fixed.length, "dead" if fixed.dead else "live", header)
            pos += fixed.length

    def _next_header(self, start: int, end: int) -> int | None:
        """Offset of the next record header in [start, end) whose checksum verifies, or None."""
        prefix = LIVE_MAGIC[:3]
        pos = start
        while pos < end:
            chunk = pread_exact(self.fd, min(RESYNC_CHUNK_BYTES, end - pos), pos)
            if not chunk:
                return None
            at = chunk.find(prefix)
            while at != -1:
                candidate = pos + at
                magic = pread_exact(self.fd, 4, candidate)
                if magic in (LIVE_MAGIC, DEAD_MAGIC):
                    try:
                        head = pread_exact(self.fd, FIXED.size, candidate)
                        fixed = parse_fixed(head)
                        parse_header(fixed, head + pread_exact(self.fd, fixed.var_len, candidate + FIXED.size))
                        return candidate
                    except RecordError:
                        pass
                at = chunk.find(prefix, at + 1)
            if pos + len(chunk) >= end:
                return None
            pos += len(chunk) - (len(prefix) - 1)  # overlap so a magic across chunks is found
        return None
