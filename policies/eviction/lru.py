"""lru: the block least recently read, or moved into this tier, leaves first."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..stats import BlockStats
from .base import EvictionPolicy


@dataclass
class LRU(EvictionPolicy):
    monotone = True

    def priority(self, key: Hashable, stats: BlockStats) -> int:
        return stats.last_used_step
