"""The eviction contract: an order over a tier's blocks, lowest priority leaves first."""

from __future__ import annotations

import heapq
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
    decreases over the clock declares `monotone = True` and is kept in a plain ordered dict; a
    block that arrives below the newest priority (a renamed block keeps its old one) waits in a
    small sorted list beside it until it is read again.
    A variant whose priority is a tuple (group, ...) that never decreases within a group (LFU:
    (hits, last use)) declares `grouped = True` and is kept in one ordered dict per group, the
    groups in a heap. If a grouped priority ever arrives out of order, the policy falls back to
    one sorted list of every block, as a variant that is neither keeps from the start. The order
    is the same either way: by priority, ties by arrival.
    """

    monotone: ClassVar[bool] = False
    grouped: ClassVar[bool] = False

    # an OrderedDict: iterating a plain dict from the front slows as deletions there pile up
    _entries: dict[Hashable, tuple[Any, int]] = field(init=False, repr=False, default_factory=OrderedDict)
    _sorted: SortedList | None = field(init=False, repr=False, default=None)
    _top: Any = field(init=False, repr=False, default=None)
    # monotone: (priority, seq, key) of the blocks that arrived below _top, and their keys
    _late: SortedList = field(init=False, repr=False, default_factory=SortedList)
    _late_keys: set = field(init=False, repr=False, default_factory=set)
    _seq: int = field(init=False, repr=False, default=0)
    _groups: dict[Any, OrderedDict] = field(init=False, repr=False, default_factory=dict)  # group -> keys, in order
    _group_top: dict[Any, Any] = field(init=False, repr=False, default_factory=dict)  # group -> its last priority, or None
    # the groups of _groups (emptied ones stay until they reach the top: a group that empties and
    # fills again, as a score's group does, costs no heap operation), as a heap whose top is not empty
    _group_heap: list = field(init=False, repr=False, default_factory=list)

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
        if new == old[0]:
            return
        if self._sorted is None and self.monotone and new >= self._top and key not in self._late_keys:
            self._seq += 1  # the newest block (a read): to the end, as _drop then _add would put it
            self._entries[key] = (new, self._seq)
            self._entries.move_to_end(key)
            self._top = new
            return
        if self._sorted is None and self.grouped and new[0] == old[0][0] and new >= self._group_top[new[0]]:
            self._seq += 1  # the newest of its group, which it stays in: to the group's end
            self._entries[key] = (new, self._seq)
            self._groups[new[0]].move_to_end(key)
            self._group_top[new[0]] = new
            return
        self._drop(key)
        self._add(key, new)

    def on_remove(self, key: Hashable) -> None:
        self._drop(key)

    def candidates(self) -> Iterator[Hashable]:
        """Tracked keys, first to leave first. Iterate it before changing the policy again."""
        if self._sorted is not None:
            return (key for _, _, key in self._sorted)
        if self.grouped:
            return self._grouped_candidates()
        if self._late_keys:
            late = self._late_keys
            in_order = ((p, s, k) for k, (p, s) in self._entries.items() if k not in late)
            return (key for _, _, key in heapq.merge(in_order, self._late))
        return iter(self._entries)

    def _grouped_candidates(self) -> Iterator[Hashable]:
        if not self._group_heap:
            return
        first, groups = self._group_heap[0], self._groups
        yield from groups[first]
        for group in sorted(g for g in groups if g != first):  # sorted only if asked past the lowest group
            yield from groups[group]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if self._sorted is not None:
            self._sorted.remove((entry[0], entry[1], key))
        elif key in self._late_keys:
            self._late_keys.discard(key)
            self._late.remove((entry[0], entry[1], key))
        elif self.grouped:
            group = entry[0][0]
            members = self._groups[group]
            del members[key]
            if not members:
                self._group_top[group] = None
                self._forget_groups()

    def _add(self, key: Hashable, priority: Any) -> None:
        self._seq += 1
        if self._sorted is None and self.monotone:
            self._entries[key] = (priority, self._seq)
            if self._top is None or priority >= self._top:
                self._top = priority
            else:
                self._late.add((priority, self._seq, key))
                self._late_keys.add(key)
            return
        if self._sorted is None and self.grouped:
            group = priority[0]
            top = self._group_top.get(group)
            if top is None or priority >= top:
                members = self._groups.get(group)
                if members is None:
                    members = self._groups[group] = OrderedDict()
                    heapq.heappush(self._group_heap, group)
                members[key] = None
                self._group_top[group] = priority
                self._entries[key] = (priority, self._seq)
                return
        if self._sorted is None:
            self._sorted = SortedList((p, s, k) for k, (p, s) in self._entries.items())
            self._groups.clear(), self._group_top.clear(), self._group_heap.clear()
        self._entries[key] = (priority, self._seq)
        self._sorted.add((priority, self._seq, key))

    def _forget_groups(self) -> None:
        """Drop emptied groups off the heap's top; rebuild the heap when emptied ones pile up inside."""
        heap, groups = self._group_heap, self._groups
        while heap and not groups[heap[0]]:
            gone = heapq.heappop(heap)
            del groups[gone], self._group_top[gone]
        if len(heap) > 2 * len(self._entries) + 64:
            for gone in [g for g, members in groups.items() if not members]:
                del groups[gone], self._group_top[gone]
            heap[:] = groups
            heapq.heapify(heap)
