"""The eviction contract: an order over a tier's blocks, lowest priority leaves first."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sortedcontainers import SortedList

from ..stats import BlockStats


@dataclass
class EvictionPolicy(ABC):
    """Keeps the blocks of one tier in eviction order.

    The store calls on_insert when a block arrives in the tier, on_update when its statistics
    change, on_remove when it leaves. `candidates()` yields keys in the order they should leave,
    and changes nothing: the store decides how many to take.

    A variant states only `priority` (lower leaves first). A variant whose priority never
    decreases over the clock declares `monotone = True` and is kept in a plain ordered dict;
    if a priority ever arrives out of order, the policy falls back to a sorted list.
    """

    monotone: ClassVar[bool] = False

    # an OrderedDict: iterating a plain dict from the front slows as deletions there pile up
    _entries: dict[Hashable, tuple[Any, int]] = field(init=False, repr=False, default_factory=OrderedDict)
    _sorted: SortedList | None = field(init=False, repr=False, default=None)
    _top: Any = field(init=False, repr=False, default=None)
    _seq: int = field(init=False, repr=False, default=0)

    @abstractmethod
    def priority(self, key: Hashable, stats: BlockStats) -> Any:
        """Sort key of a block; the lowest is evicted first."""

    def on_insert(self, key: Hashable, stats: BlockStats) -> None:
        if key in self._entries:
            raise KeyError(f"{key} is already tracked by {type(self).__name__}")
        self._add(key, self.priority(key, stats))

    def on_update(self, key: Hashable, stats: BlockStats) -> None:
        old = self._entries.get(key)
        if old is None:
            raise KeyError(f"{key} is not tracked by {type(self).__name__}")
        new = self.priority(key, stats)
        if new != old[0]:
            self._drop(key)
            self._add(key, new)

    def on_remove(self, key: Hashable) -> None:
        self._drop(key)

    def candidates(self) -> Iterator[Hashable]:
        """Tracked keys, first to leave first. Iterate it before changing the policy again."""
        if self._sorted is None:
            return iter(self._entries)
        return (key for _, _, key in self._sorted)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and self._sorted is not None:
            self._sorted.remove((entry[0], entry[1], key))

    def _add(self, key: Hashable, priority: Any) -> None:
        self._seq += 1
        if self._sorted is None and self.monotone and (self._top is None or priority >= self._top):
            self._top = priority
            self._entries[key] = (priority, self._seq)
            return
        if self._sorted is None:
            self._sorted = SortedList((p, s, k) for k, (p, s) in self._entries.items())
        self._entries[key] = (priority, self._seq)
        self._sorted.add((priority, self._seq, key))
