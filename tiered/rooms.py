"""One eviction order per room of a tier.

A tier split into rooms (the device tier: one room per layer, see tiered.device) evicts a block
only to make room for another of the same room. With one order over the whole tier, finding a
victim walks past the blocks of every other room first: at 30 layers, about a hundred keys for
each block a prefetch brings up. Each room keeps its own policy instead, so its first candidate
is the victim. Within a room the order is the one a single policy would give for policies whose
priority is a block's own statistics (LRU, FIFO, LFU, importance); adaptive ones (ARC, S3-FIFO)
adapt to each room as to a cache of its own (so an ARC `capacity_blocks` given in the store's
eviction_kwargs is a room's capacity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from policies import BlockStats, EvictionPolicy

from .block import BlockKey


class RoomPolicies:
    """The eviction policies of one tier's rooms: `make()` builds each, `room_of` routes a key."""

    def __init__(self, make: Callable[[], EvictionPolicy], rooms: int, room_of: Callable[[BlockKey], int]) -> None:
        self.rooms = [make() for _ in range(rooms)]
        self._room_of = room_of

    def on_insert(self, key: BlockKey, stats: BlockStats) -> None:
        self.rooms[self._room_of(key)].on_insert(key, stats)

    def on_update(self, key: BlockKey, stats: BlockStats) -> None:
        self.rooms[self._room_of(key)].on_update(key, stats)

    def on_remove(self, key: BlockKey) -> None:
        self.rooms[self._room_of(key)].on_remove(key)

    def candidates(self, room: int) -> Iterator[BlockKey]:
        """Room `room`'s keys, first to leave first (EvictionPolicy.candidates)."""
        return self.rooms[room].candidates()

    def __len__(self) -> int:
        return sum(len(policy) for policy in self.rooms)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.rooms[self._room_of(key)]
