"""The device tier: a preallocated pool of block slots in accelerator memory (CPU memory without one).

Putting a block copies it into a free slot; nothing is reallocated or concatenated, and attention
can read slots in place. A partial block occupies a whole slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .block import BlockKey, BlockLayout, KVBlock
from .tier import Tier


class DeviceTier(Tier):
    name = "device"

    def __init__(self, device: torch.device, capacity_bytes: int) -> None:
        self.device = device
        self._capacity_bytes = capacity_bytes
        self.layout: BlockLayout | None = None  # set by allocate(), from the store's first block
        self.slot_bytes = 0
        self.keys_pool = self.values_pool = torch.empty(0, device=device)
        self._free: list[int] = []
        self._slot_keys: list[torch.Tensor] = []
        self._slot_values: list[torch.Tensor] = []
        self._slots: dict[BlockKey, tuple[int, int]] = {}  # key -> (slot, tokens)

    def slots_for(self, layout: BlockLayout) -> int:
        """How many blocks of `layout` the pool would hold; ValueError if not one."""
        slots = self._capacity_bytes // layout.block_nbytes
        if slots == 0:
            raise ValueError(
                f"a block of {layout.block_nbytes} bytes is larger than the device tier's "
                f"device_bytes={self._capacity_bytes}"
            )
        return slots

    def allocate(self, layout: BlockLayout) -> None:
        """Preallocate the slot pool for blocks of `layout`; once, before the first put."""
        if self.layout is not None:
            raise RuntimeError("the device tier's pool is already allocated")
        slots = self.slots_for(layout)
        shape = (slots, layout.kv_heads, layout.block_tokens, layout.head_dim)
        # keys_pool, values_pool: [slots, kv_heads, block_tokens, head_dim]
        self.keys_pool = torch.empty(shape, dtype=layout.dtype, device=self.device)
        self.values_pool = torch.empty(shape, dtype=layout.dtype, device=self.device)
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        # Per-slot views, made once: indexing the pool costs more than copying a small block.
        self._slot_keys = list(self.keys_pool.unbind(0))  # each [kv_heads, block_tokens, head_dim]
        self._slot_values = list(self.values_pool.unbind(0))
        self.layout = layout
        self.slot_bytes = layout.block_nbytes

    @property
    def slots(self) -> int:
        return self.keys_pool.shape[0] if self.layout is not None else 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._slots

    def slot_of(self, key: BlockKey) -> tuple[int, int] | None:
        """(slot, tokens) of `key`, or None."""
        return self._slots.get(key)

    def get(self, key: BlockKey) -> KVBlock | None:
        """Views of the block's slot; valid until the block is removed or overwritten."""
        entry = self._slots.get(key)
        if entry is None:
            return None
        slot, tokens = entry
        keys, values = self._slot_keys[slot], self._slot_values[slot]
        if tokens < self.layout.block_tokens:
            keys, values = keys[:, :tokens], values[:, :tokens]
        return KVBlock.trusted(keys, values)

    def put(self, key: BlockKey, item: KVBlock) -> list[BlockKey]:
        if key in self._slots:
            raise KeyError(f"{key} is already in the device tier")
        if not self._free:
            raise RuntimeError("device tier has no free slot (or no pool); the store must make room first")
        slot = self._free.pop()
        tokens = item.tokens
        keys, values = self._slot_keys[slot], self._slot_values[slot]
        if tokens < self.layout.block_tokens:
            keys, values = keys[:, :tokens], values[:, :tokens]
        non_blocking = self.device.type == "cuda" and item.keys.is_pinned()
        keys.copy_(item.keys, non_blocking=non_blocking)
        values.copy_(item.values, non_blocking=non_blocking)
        self._slots[key] = (slot, tokens)
        return []

    def remove(self, key: BlockKey) -> bool:
        entry = self._slots.pop(key, None)
        if entry is None:
            return False
        self._free.append(entry[0])
        return True

    def charge(self, item: KVBlock) -> int:
        return self.slot_bytes

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.slot_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    @property
    def free_bytes(self) -> int:
        # Whole slots only: the remainder of capacity_bytes below one slot can hold nothing.
        return len(self._free) * self.slot_bytes

    def close(self) -> None:
        self._slots.clear()
        self._free.clear()
        self._slot_keys, self._slot_values = [], []
        self.keys_pool = self.values_pool = torch.empty(0, device=self.device)
