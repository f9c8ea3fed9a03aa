"""The host tier: encoded blocks in a pool of host-memory slots, pinned when a CUDA device is in use.

Slots are the host codec's size of one full block and are reused, so a spill writes into memory
that is already mapped (and, with CUDA, pinned: device copies can then run asynchronously). A
payload encoded on a CUDA device is copied into its slot on the transfer stream (tiered.transfer)
and put returns before the copy is done; get and remove wait for it. The
pool grows in chunks up to its capacity, plus one spare slot: while a block is promoted out of a
full host tier, the device's victim lands in the spare before the promoted block's slot is freed.
A partial block occupies a whole slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .block import BlockKey, BlockLayout
from .codecs import Encoded
from .tier import Tier
from .transfer import copy_into

CHUNK_BYTES = 32 << 20  # the pool grows by about this much at a time


class HostTier(Tier):
    name = "host"

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        self._capacity_bytes = capacity_bytes
        self.pin = pin
        self.slot_bytes = 0  # set by allocate()
        self._max_slots = 0
        self._chunks: list[torch.Tensor] = []  # each [slots_in_chunk, slot_bytes] uint8
        self._free: list[torch.Tensor] = []  # free slots, each [slot_bytes] uint8
        self._items: dict[BlockKey, tuple[Encoded, torch.Tensor]] = {}  # key -> (encoded, its slot)

    def allocate(self, layout: BlockLayout, item_bytes: int) -> None:
        """Size the pool's slots: `item_bytes`, the host codec's bytes for one full block."""
        slot_bytes = item_bytes
        if self.slot_bytes:
            raise RuntimeError("the host tier's slots are already sized")
        if slot_bytes > self._capacity_bytes:
            raise ValueError(f"a slot of {slot_bytes} bytes is larger than host_bytes={self._capacity_bytes}")
        self.slot_bytes = slot_bytes
        self._max_slots = self._capacity_bytes // slot_bytes

    @property
    def slots(self) -> int:
        return self._max_slots

    def landing_buffers(self, sizes: list[int]) -> list[torch.Tensor]:
        """Free slots for the next puts, one per payload size (fewer when the pool has not that
        many): the i-th is where the i-th next put lands. Slots are taken from the top of the free
        stack and freed ones pushed on it, so a buffer whose put is still to come is never handed
        to an earlier put: a put that lands elsewhere copies its payload from its buffer."""
        while len(self._free) < len(sizes) and self._grow():
            pass
        free = self._free
        count = min(len(sizes), len(free))
        return [  # the top of the stack first
            free[-1 - i] if sizes[i] == self.slot_bytes else free[-1 - i][: sizes[i]] for i in range(count)
        ]

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._items

    def get(self, key: BlockKey) -> Encoded | None:
        """The stored payload, a view of a slot: valid until the key is removed."""
        entry = self._items.get(key)
        return None if entry is None else entry[0].wait()

    def put(self, key: BlockKey, item: Encoded) -> list[BlockKey]:
        if not isinstance(item, Encoded):
            raise TypeError(f"the host tier stores Encoded blocks, got {type(item).__name__}")
        if key in self._items:
            raise KeyError(f"{key} is already in the host tier")
        if item.nbytes > self.slot_bytes:
            raise ValueError(f"a payload of {item.nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        landing = self.landing_buffers([item.nbytes])
        if not landing:
            raise RuntimeError("host tier has no free slot; the store must make room first")
        buffer = landing[0]
        ready = item.ready  # set when the codec encoded into the slot from a CUDA device
        if buffer.data_ptr() != item.payload.data_ptr():
            if item.payload.device.type == "cpu":
                item.wait()
            ready = copy_into(item.payload.view(-1), buffer)  # from CUDA: asynchronous, on the transfer stream
        slot = self._free.pop()
        self._items[key] = (Encoded(item.codec, item.dtype, item.shape, buffer, ready), slot)
        return []

    def rename(self, old: BlockKey, new: BlockKey) -> list[BlockKey]:
        """Relabel `old`'s slot in place."""
        if new in self._items:
            raise KeyError(f"{new} is already in the host tier")
        self._items[new] = self._items.pop(old)
        return []

    def remove(self, key: BlockKey) -> bool:
        entry = self._items.pop(key, None)
        if entry is None:
            return False
        entry[0].wait()  # a copy still landing in the slot finishes before the slot is reused
        self._free.append(entry[1])
        return True

    def charge(self, item: Encoded) -> int:
        return self.slot_bytes

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used_bytes(self) -> int:
        return len(self._items) * self.slot_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def free_bytes(self) -> int:
        # Whole slots only, allocated or not.
        return (self._max_slots - len(self._items)) * self.slot_bytes

    def close(self) -> None:
        self._items.clear()
        self._free.clear()
        self._chunks.clear()

    def _grow(self) -> bool:
        allocated = sum(chunk.shape[0] for chunk in self._chunks)
        count = min(max(1, CHUNK_BYTES // max(self.slot_bytes, 1)), self._max_slots + 1 - allocated)
        if count <= 0:
            return False
        with torch.inference_mode(False):  # a plain tensor, writable outside inference mode too
            chunk = torch.empty((count, self.slot_bytes), dtype=torch.uint8, pin_memory=self.pin)  # [slots, slot_bytes]
        self._chunks.append(chunk)
        self._free.extend(reversed(chunk.unbind(0)))
        return True
