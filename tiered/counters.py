"""Counters of what a TieredStore did, per tier and in all."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class TierCounters:
    hits: int = 0  # get() found the block in this tier
    misses: int = 0  # get() looked in this tier and the block was not there
    promotions: int = 0  # blocks moved up out of this tier, by get or prefetch
    prefetched: int = 0  # of those, moved by prefetch
    evictions: int = 0  # blocks moved down out of this tier to make room
    dropped: int = 0  # blocks that left the store from this tier to make room
    bytes_in: int = 0  # bytes written into this tier (as the tier stores them)
    bytes_out: int = 0  # bytes read out of this tier by promotions and evictions
    wait_s: float = 0.0  # time get() spent bringing blocks up from this tier
    read_s: float = 0.0  # time reads spent getting and decoding this tier's blocks where they lie

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class StoreCounters:
    puts: int = 0
    gets: int = 0
    hits: int = 0  # gets that found the block in some tier
    misses: int = 0  # gets that found it nowhere
    removes: int = 0  # remove() calls that removed a block
    prefetch_requests: int = 0  # keys passed to prefetch()
    sealed: int = 0  # full blocks relabelled with their content key
    seal_hits: int = 0  # seals that found the content already stored (the copy was dropped)
    write_through_blocks: int = 0  # sealed blocks written through to the disk tier
    write_through_bytes: int = 0  # their bytes, as the disk codec encodes them (before compression)
    write_through_errors: int = 0  # write-throughs that failed (the block stayed where it was)
    last_write_error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class SchedulerCounters:
    """What the prefetch scheduler (tiered.scheduler) did with the blocks plans asked for."""

    requested_blocks: int = 0  # blocks plans asked for that the store held
    joined_requests: int = 0  # of those, requests that joined a move already queued or running
    moved_blocks: int = 0  # moves that brought their block up
    up_blocks: int = 0  # moves that found their block on the device already
    skipped_blocks: int = 0  # moves with nothing to do: gone, being read, or no unprotected room
    cancelled_blocks: int = 0  # queued moves cancelled: superseded by a newer plan, or the store closed
    failed_blocks: int = 0  # moves that raised; the block stayed where it lay (or was found damaged)
    last_error: str = ""  # the last failed move's key and error
    stall_s: float = 0.0  # time reads waited for blocks that were requested but not yet up
    stalled_reads: int = 0  # reads that waited

    def as_dict(self) -> dict:
        return asdict(self)
