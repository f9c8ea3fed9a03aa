"""The device tier: a preallocated pool of block slots in accelerator memory (CPU memory without one).

Putting a block copies it into a free slot; nothing is reallocated or concatenated. The pool is
head-major, `[kv_heads, slots, block_tokens, head_dim]`, so blocks in consecutive slots are one
`[kv_heads, tokens, head_dim]` view that attention reads in place. The pool can be split into
rooms, one per layer: a layer's blocks then take slots from its own room, lowest first, so one
sequence's blocks of a layer sit in consecutive slots. A partial block occupies a whole slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .block import BlockKey, BlockLayout, KVBlock
from .tier import Tier


class DeviceTier(Tier):
    name = "device"

    def __init__(self, device: torch.device, capacity_bytes: int, rooms: int = 1) -> None:
        self.device = device
        self.rooms = rooms  # one per layer when the store knows the layer count, else 1
        self._capacity_bytes = capacity_bytes
        self.layout: BlockLayout | None = None  # set by allocate(), from the store's first block
        self.slot_bytes = 0
        self.room_slots = 0  # slots per room
        self.keys_pool = self.values_pool = torch.empty(0, device=device)
        self._free: list[list[int]] = [[] for _ in range(rooms)]  # per room; pop() gives the lowest
        self._slot_keys: list[torch.Tensor] = []
        self._slot_values: list[torch.Tensor] = []
        self._slots: dict[BlockKey, tuple[int, int]] = {}  # key -> (slot, tokens)

    def slots_for(self, layout: BlockLayout) -> int:
        """Slots per room the pool would have for `layout`; ValueError if not one."""
        per_room = self._capacity_bytes // layout.block_nbytes // self.rooms
        if per_room == 0:
            raise ValueError(
                f"a block of {layout.block_nbytes} bytes is larger than the device tier's share of "
                f"device_bytes={self._capacity_bytes} per layer ({self.rooms} layers)"
                if self.rooms > 1
                else f"a block of {layout.block_nbytes} bytes is larger than the device tier's "
                f"device_bytes={self._capacity_bytes}"
            )
        return per_room

    def allocate(self, layout: BlockLayout, item_bytes: int) -> None:
        """Preallocate the slot pool for blocks of `layout` (a slot is `layout.block_nbytes`; the
        contract's `item_bytes` says no more)."""
        if self.layout is not None:
            raise RuntimeError("the device tier's pool is already allocated")
        self.room_slots = self.slots_for(layout)
        slots = self.room_slots * self.rooms
        shape = (layout.kv_heads, slots, layout.block_tokens, layout.head_dim)
        # keys_pool, values_pool: [kv_heads, slots, block_tokens, head_dim]; plain tensors even when the
        # first put comes from inside torch.inference_mode, so writes outside it stay allowed
        with torch.inference_mode(False):
            self.keys_pool = torch.empty(shape, dtype=layout.dtype, device=self.device)
            self.values_pool = torch.empty(shape, dtype=layout.dtype, device=self.device)
        self._free = [
            list(range((room + 1) * self.room_slots - 1, room * self.room_slots - 1, -1)) for room in range(self.rooms)
        ]
        # Per-slot views, made once: indexing the pool costs more than copying a small block.
        self._slot_keys = list(self.keys_pool.unbind(1))  # each [kv_heads, block_tokens, head_dim]
        self._slot_values = list(self.values_pool.unbind(1))
        self.layout = layout
        self.slot_bytes = layout.block_nbytes

    def room_of(self, key: BlockKey) -> int:
        return key.layer % self.rooms

    def free_bytes_for(self, key: BlockKey) -> int:
        return len(self._free[self.room_of(key)]) * self.slot_bytes

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._slots

    @property
    def slot_table(self) -> dict[BlockKey, tuple[int, int]]:
        """key -> (slot, tokens) of every block on the device; read it, never change it."""
        return self._slots

    def slot_of(self, key: BlockKey) -> tuple[int, int] | None:
        """(slot, tokens) of `key`, or None."""
        return self._slots.get(key)

    def get(self, key: BlockKey) -> KVBlock | None:
        """Views of the block's slot; valid until the block is removed or overwritten."""
        entry = self._slots.get(key)
        if entry is None:
            return None
        return self._views(*entry)

    def put(self, key: BlockKey, item: KVBlock) -> list[BlockKey]:
        if not isinstance(item, KVBlock):
            raise TypeError(f"the device tier stores KVBlocks, got {type(item).__name__}")
        view = self.reserve(key, item.tokens)
        non_blocking = self.device.type == "cuda" and item.keys.is_pinned()
        view.keys.copy_(item.keys, non_blocking=non_blocking)
        view.values.copy_(item.values, non_blocking=non_blocking)
        return []

    def reserve(self, key: BlockKey, tokens: int) -> KVBlock:
        """Take a free slot for `key`, to hold `tokens` tokens, and return its views for the caller
        to fill (a codec decodes straight into them). remove(key) gives the slot back."""
        if key in self._slots:
            raise KeyError(f"{key} is already in the device tier")
        free = self._free[self.room_of(key)] if self.layout is not None else []
        if not free:
            raise RuntimeError("device tier has no free slot (or no pool); the store must make room first")
        slot = free.pop()
        self._slots[key] = (slot, tokens)
        return self._views(slot, tokens)

    def write_tokens(self, key: BlockKey, offset: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write `keys`, `values` ([kv_heads, n, head_dim]) at token `offset` of a stored block,
        which then holds max(its tokens, offset + n) tokens. The caller checked the bounds."""
        slot, tokens = self._slots[key]
        end = offset + keys.shape[1]
        self._slot_keys[slot][:, offset:end].copy_(keys)
        self._slot_values[slot][:, offset:end].copy_(values)
        self._slots[key] = (slot, max(tokens, end))

    def rename(self, old: BlockKey, new: BlockKey) -> list[BlockKey]:
        """Relabel `old`'s slot in place (both keys must take room from the same layer's room)."""
        if self.room_of(old) != self.room_of(new):
            raise ValueError(f"{old} and {new} belong to different rooms of the device tier")
        if new in self._slots:
            raise KeyError(f"{new} is already in the device tier")
        self._slots[new] = self._slots.pop(old)
        return []

    def remove(self, key: BlockKey) -> bool:
        entry = self._slots.pop(key, None)
        if entry is None:
            return False
        self._free[self.room_of(key)].append(entry[0])
        return True

    def charge(self, item: KVBlock) -> int:
        return self.slot_bytes

    def held(self, key: BlockKey) -> tuple[int, int] | None:
        entry = self._slots.get(key)
        return None if entry is None else (self.slot_bytes, entry[1])

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def slots(self) -> int:
        return self.room_slots * self.rooms

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.slot_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def free_bytes(self) -> int:
        # Whole slots only: the remainder of capacity_bytes below one slot can hold nothing.
        return sum(len(free) for free in self._free) * self.slot_bytes

    def close(self) -> None:
        self._slots.clear()
        self._free = [[] for _ in range(self.rooms)]
        self._slot_keys, self._slot_values = [], []
        self.keys_pool = self.values_pool = torch.empty(0, device=self.device)

    def _views(self, slot: int, tokens: int) -> KVBlock:
        keys, values = self._slot_keys[slot], self._slot_values[slot]
        if tokens < self.layout.block_tokens:
            keys, values = keys[:, :tokens], values[:, :tokens]
        return KVBlock.trusted(keys, values)
