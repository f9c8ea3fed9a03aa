"""The host tier: encoded blocks in host memory, pinned when a CUDA device is in use.

Pinned payloads let device copies run asynchronously; without CUDA, memory is plain.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .block import BlockKey
from .codecs import Encoded
from .tier import Tier


class HostTier(Tier):
    name = "host"

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        self._capacity_bytes = capacity_bytes
        self.pin = pin
        self._items: dict[BlockKey, Encoded] = {}
        self._used_bytes = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._items

    def get(self, key: BlockKey) -> Encoded | None:
        return self._items.get(key)

    def put(self, key: BlockKey, item: Encoded) -> list[BlockKey]:
        if key in self._items:
            raise KeyError(f"{key} is already in the host tier")
        item = item.to(torch.device("cpu"), pin=self.pin)
        self._items[key] = item
        self._used_bytes += item.nbytes
        return []

    def remove(self, key: BlockKey) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self._used_bytes -= item.nbytes
        return True

    def charge(self, item: Encoded) -> int:
        return item.nbytes

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def close(self) -> None:
        self._items.clear()
        self._used_bytes = 0
