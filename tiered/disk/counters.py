"""Counters of what a disk tier did: writes, reads, damage found, evictions and compactions."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class DiskCounters:
    records_written: int = 0  # records put (compaction copies not included)
    logical_bytes_written: int = 0  # Encoded payload bytes put, before compression
    stored_bytes_written: int = 0  # record bytes appended by puts (headers + stored payloads)
    reads: int = 0  # records read back intact by get
    damaged_records: int = 0  # damaged or torn records and stretches found, on open or by get/compaction
    segments_created: int = 0
    segments_evicted: int = 0  # dropped whole to keep within capacity
    records_evicted: int = 0  # live records that left with them
    segments_compacted: int = 0  # rewritten and deleted because they were mostly dead
    records_compacted: int = 0  # live records copied by compaction
    write_errors: int = 0  # writes that failed (ENOSPC, EIO...); the error reached the caller of put
    opened_from_snapshot: bool = False  # the index came from a verified snapshot
    snapshot_note: str = ""  # why the snapshot was not used, when it was not
    last_error: str = ""  # the last error the background compactor met

    def as_dict(self) -> dict:
        return asdict(self)
