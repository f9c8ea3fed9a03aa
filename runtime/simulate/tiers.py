"""The simulated tiers: each a capacity in blocks kept in order by a policy from the registry.

A TierCache does what the store's Placement does to a policy, on counts of blocks instead of
bytes: it makes room (the policy's first candidate leaves) before it inserts, tells the policy
about every insert, read and removal, and keeps a BlockStats per block on one logical clock.
"""

from __future__ import annotations

from collections.abc import Hashable

from policies import BlockStats, EvictionPolicy


class TierCache:
    """One tier of `capacity_blocks` blocks; `policy` decides which block leaves when it is full."""

    __slots__ = ("name", "capacity_blocks", "policy", "stats", "evictions", "_update", "_insert", "_remove", "_order")

    def __init__(self, name: str, capacity_blocks: int, policy: EvictionPolicy) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"the {name} tier needs capacity_blocks >= 1, got {capacity_blocks}")
        self.name = name
        self.capacity_blocks = capacity_blocks
        self.policy = policy
        self.stats: dict[Hashable, BlockStats] = {}
        self.evictions = 0
        self._update, self._insert, self._remove = policy.on_update, policy.on_insert, policy.on_remove
        self._order = policy.candidates

    def __contains__(self, key: Hashable) -> bool:
        return key in self.stats

    def __len__(self) -> int:
        return len(self.stats)

    def touch(self, key: Hashable, step: int) -> BlockStats:
        """Record a read of `key`, which the tier holds, at `step`."""
        stats = self.stats[key]
        stats.hits += 1
        stats.last_access_step = step
        self._update(key, stats)
        return stats

    def admit(self, key: Hashable, step: int, score: float = 0.0) -> tuple[Hashable, BlockStats] | None:
        """Insert `key` (not held) at `step`; the block evicted to make room and its stats, if any."""
        held, victim = self.stats, None
        if len(held) >= self.capacity_blocks:
            gone = next(iter(self._order()))
            self._remove(gone)
            victim = (gone, held.pop(gone))
            self.evictions += 1
        held[key] = stats = BlockStats(1, self.name, step, step, step, 0, 0, score)
        self._insert(key, stats)
        return victim
