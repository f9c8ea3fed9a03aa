"""The contract every tier keeps. TieredStore composes tiers; a tier knows nothing of the others.

A tier is not thread-safe on its own: TieredStore serializes calls into it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from .block import BlockKey, BlockLayout


class Tier(ABC):
    """One level of the hierarchy. Items are KVBlocks in the device tier, Encoded elsewhere."""

    name: str
    # True for a tier that enforces its own capacity inside put (and reports what it dropped);
    # the store then never asks the eviction policy to make room in it.
    evicts_itself: bool = False
    # True for a tier whose get may run outside the store's lock, alongside its other calls (the
    # disk tier: its log locks itself); the store reads such a tier's blocks (a slow read from
    # storage, which may raise OSError) without holding its lock.
    reads_unlocked: bool = False
    # True for a tier whose get returns a new copy read out of storage (disk, shared) rather than
    # a view of memory the tier holds: a reader that keeps it holds the block in memory beyond
    # the tier's capacity, so reads keep such items no longer than one read.
    get_copies: bool = False
    rooms: int = 1  # how many parts room_of names (0..rooms-1)

    def allocate(self, layout: BlockLayout, item_bytes: int) -> None:
        """Size the tier for blocks of `layout`, a full one taking `item_bytes` as this tier stores it
        (its codec's payload; the block's own bytes in the device tier). Called once, when the first
        block fixes the layout, before any put. The default has nothing to size."""

    def landing_buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """Buffers ([nbytes] uint8, one per size, in order) that the next puts of payloads of those
        sizes keep as they are, for a codec to encode straight into; fewer (or none: the default)
        when the tier has not that many free. A buffer stays intact until its own put, and a put
        whose payload is not in the buffer it lands in copies it."""
        return []

    @abstractmethod
    def __contains__(self, key: BlockKey) -> bool:
        """True if the tier holds `key`."""

    @abstractmethod
    def get(self, key: BlockKey) -> Any | None:
        """The item stored under `key`, or None; placement does not change."""

    @abstractmethod
    def put(self, key: BlockKey, item: Any) -> list[BlockKey]:
        """Store `item` under `key`; the caller has made room. Returns keys the tier dropped to do it.

        If put raises, the tier is as it was before the call.
        """

    @abstractmethod
    def remove(self, key: BlockKey) -> bool:
        """Forget `key`; True if it was there. Views returned by get for it become invalid."""

    def rename(self, old: BlockKey, new: BlockKey) -> list[BlockKey]:
        """Hold the item of `old` under `new` (a key the tier does not hold); `old` is then absent.

        Returns keys the tier dropped to do it. KeyError if `old` is absent or unreadable. The
        default copies the item; a tier that can relabel it in place overrides this.
        """
        item = self.get(old)
        if item is None:
            raise KeyError(f"{old} is not in the {self.name} tier")
        dropped = self.put(new, item)
        self.remove(old)
        return dropped

    @abstractmethod
    def charge(self, item: Any) -> int:
        """Bytes of capacity `item` would take in this tier."""

    def charge_for(self, nbytes: int) -> int:
        """Bytes of capacity an item of `nbytes` payload bytes would take (the tier's overhead included)."""
        return nbytes

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]:
        """Every key the tier holds."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Capacity in use."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Capacity in all."""

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def room_of(self, key: BlockKey) -> int:
        """The part of the tier `key` takes room from; blocks in other rooms cannot free it."""
        return 0

    def free_bytes_for(self, key: BlockKey) -> int:
        """Capacity free in the room `key` would go to."""
        return self.free_bytes

    def held(self, key: BlockKey) -> tuple[int, int] | None:
        """(capacity bytes, tokens) of the block stored under `key`; None if the tier cannot return it.

        The default reads the item; a tier that knows without reading it (the disk tier) overrides this.
        """
        item = self.get(key)
        return None if item is None else (self.charge(item), item.shape[1])

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def sync(self) -> None:
        """Make what put stored durable (a tier over files); the default has nothing to do."""

    def close(self) -> None:
        """Release what the tier holds; it is not used afterwards."""
