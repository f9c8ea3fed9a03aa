"""arc: Adaptive Replacement Cache, balancing recency (T1) against frequency (T2) with ghost lists.

ARC (Megiddo, Modha: "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003,
https://www.usenix.org/conference/fast-03/arc-self-tuning-low-overhead-replacement-cache):

- T1 holds blocks read once since they arrived, T2 blocks read again; both are LRU lists;
- B1 and B2 are ghost lists (keys only) of blocks recently evicted from T1 and T2;
- a block arriving that B1 remembers raises the target size p of T1 by max(|B2| / |B1|, 1), one
  that B2 remembers lowers it by max(|B1| / |B2|, 1); either goes to T2, a new block to T1;
- REPLACE evicts T1's least recent block into B1 if |T1| > p (or T2 is empty), else T2's into B2;
- the ghosts are trimmed as in the paper: |T1| + |B1| <= c, and all four lists <= 2c.

The eviction contract makes room before the arriving block is named (the store calls
`candidates()`, removes the victim, then calls `on_insert`), so REPLACE runs before the
arrival adapts p, and without the paper's tie clause for an arrival from B2 when |T1| = p.
Apart from that order, a ghost hit's adaptation counts from the next eviction on, the lists
evolve as in the paper. Removing the block `candidates()` names first is that eviction and
records the ghost; removing any other block (a promotion, a deletion) just forgets it.

The capacity c in blocks is `capacity_blocks`, or, when None, the most blocks the tier has held
at once (a tier evicts only when full, so that is its capacity for blocks of one size).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from ..stats import BlockStats
from .base import EvictionPolicy


@dataclass
class ARC(EvictionPolicy):
    """ARC eviction. See the module docstring for the algorithm and the contract mapping.

    capacity_blocks  capacity of the tier in blocks; None: the high-water mark of len(self)
    """

    capacity_blocks: int | None = None

    _t1: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)  # least recent first
    _t2: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)
    _b1: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)
    _b2: OrderedDict[Hashable, None] = field(init=False, repr=False, default_factory=OrderedDict)
    _target_t1: float = field(init=False, repr=False, default=0.0)  # the paper's p
    _seen: dict[Hashable, tuple[int, int]] = field(init=False, repr=False, default_factory=dict)
    _high_water: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if self.capacity_blocks is not None and (not isinstance(self.capacity_blocks, int) or self.capacity_blocks < 1):
            raise ValueError(f"ARC: capacity_blocks must be None or an int >= 1, got {self.capacity_blocks!r}")

    @property
    def target_t1(self) -> float:
        """The adaptive target size of T1 (the paper's p), in blocks."""
        return self._target_t1

    def priority(self, key: Hashable, stats: BlockStats) -> int:
        """Position of `key` in the current eviction order (0 leaves first). O(n): for inspection."""
        for position, candidate in enumerate(self.candidates()):
            if candidate == key:
                return position
        raise KeyError(f"{key} is not tracked by ARC")

    def on_insert(self, key: Hashable, stats: BlockStats) -> None:
        if key in self._seen:
            raise KeyError(f"{key} is already tracked by ARC")
        self._seen[key] = (stats.hits, stats.last_access_step)
        self._high_water = max(self._high_water, len(self._seen))
        c = self.capacity_blocks or self._high_water
        b1, b2 = len(self._b1), len(self._b2)
        if key in self._b1:
            self._target_t1 = min(self._target_t1 + max(b2 / b1, 1.0), c)
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._target_t1 = max(self._target_t1 - max(b1 / b2, 1.0), 0.0)
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
            if len(self._t1) + len(self._b1) > c and self._b1:
                self._b1.popitem(last=False)
            elif len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c and self._b2:
                self._b2.popitem(last=False)

    def on_update(self, key: Hashable, stats: BlockStats) -> None:
        seen = self._seen.get(key)
        if seen is None:
            raise KeyError(f"{key} is not tracked by ARC")
        if stats.hits > seen[0] or stats.last_access_step > seen[1]:  # a read: most recent in T2
            if self._t1.pop(key, False) is not None:
                del self._t2[key]
            self._t2[key] = None
        self._seen[key] = (stats.hits, stats.last_access_step)

    def on_remove(self, key: Hashable) -> None:
        if key not in self._seen:
            return
        first = self._t1 if self._replaces_t1(len(self._t1), len(self._t2)) else self._t2
        evicted = key == next(iter(first))  # the block REPLACE takes: an eviction, remembered in a ghost
        if self._t1.pop(key, False) is None:
            if evicted:
                self._b1[key] = None
        else:
            del self._t2[key]
            if evicted:
                self._b2[key] = None
        del self._seen[key]

    def candidates(self) -> Iterator[Hashable]:
        """Tracked keys in the order successive REPLACE steps would take them; changes nothing."""
        t1_left, t2_left = len(self._t1), len(self._t2)
        t1, t2 = iter(self._t1), iter(self._t2)
        while t1_left or t2_left:
            if self._replaces_t1(t1_left, t2_left):
                t1_left -= 1
                yield next(t1)
            else:
                t2_left -= 1
                yield next(t2)

    def _replaces_t1(self, t1_blocks: int, t2_blocks: int) -> bool:
        """REPLACE's choice: T1's least recent block leaves (True) or T2's (False)."""
        return t1_blocks > 0 and (t1_blocks > self._target_t1 or t2_blocks == 0)

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen
