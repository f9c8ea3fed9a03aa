"""The index snapshot: the index as it was at a clean close, so that reopening need not read every record.

INDEX.snapshot = one line b"TKVI <version> <xxh3-64 hex of the body>\\n", then a JSON body:
    {"next_seq": int,
     "segments": [[id, uuid hex, end bytes], ...],
     "records": [[namespace, layer, index, segment id, offset, length, header_len, seq, raw_len, tokens], ...]}

It is written atomically (temporary file, fsync, rename). It is a hint, never trusted blindly:
recovery.py checks it against the segments and falls back to scanning them when it does not match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..block import BlockKey
from .files import atomic_write
from .index import Index, Location

SNAPSHOT_NAME = "INDEX.snapshot"
SNAPSHOT_VERSION = 1
MAX_SNAPSHOT_BYTES = 1 << 30


class SnapshotError(ValueError):
    """The snapshot is missing, damaged or malformed; `str()` says which."""


@dataclass(frozen=True, slots=True)
class SnapshotSegment:
    id: int
    uuid: bytes
    end: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    next_seq: int
    segments: list[SnapshotSegment]
    records: list[tuple[BlockKey, Location]]


def write_snapshot(directory: Path, next_seq: int, segments: list[SnapshotSegment], index: Index) -> None:
    records = [
        [key.namespace, key.layer, key.index, loc.segment_id, loc.offset, loc.length, loc.header_len, loc.seq,
         loc.raw_len, loc.tokens]
        for key, loc in index.items()
    ]
    body = json.dumps(
        {"next_seq": next_seq, "segments": [[s.id, s.uuid.hex(), s.end] for s in segments], "records": records},
        separators=(",", ":"),
    ).encode()
    head = f"TKVI {SNAPSHOT_VERSION} {xxhash.xxh3_64_hexdigest(body)}\n".encode()
    atomic_write(directory / SNAPSHOT_NAME, head + body)


def _nat(value) -> int:
    if type(value) is not int or value < 0:
        raise SnapshotError(f"expected a non-negative int, got {value!r}")
    return value


def load_snapshot(directory: Path) -> Snapshot:
    """The snapshot in `directory`; SnapshotError if there is none or it does not parse and verify."""
    path = directory / SNAPSHOT_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError("no snapshot") from None
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("snapshot too large")
    head, _, body = data.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 3 or parts[0] != b"TKVI" or parts[1] != str(SNAPSHOT_VERSION).encode():
        raise SnapshotError("not a snapshot of this version")
    if xxhash.xxh3_64_hexdigest(body).encode() != parts[2]:
        raise SnapshotError("snapshot checksum mismatch")
    try:
        doc = json.loads(body)
        segments = [SnapshotSegment(_nat(i), bytes.fromhex(u), _nat(e)) for i, u, e in doc["segments"]]
        records = []
        for ns, layer, index, seg, offset, length, header_len, seq, raw_len, tokens in doc["records"]:
            loc = Location(_nat(seg), _nat(offset), _nat(length), _nat(header_len), _nat(seq), _nat(raw_len),
                           _nat(tokens))
            records.append((BlockKey(ns, layer, index), loc))
        return Snapshot(_nat(doc["next_seq"]), segments, records)
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"malformed snapshot: {err}") from None
