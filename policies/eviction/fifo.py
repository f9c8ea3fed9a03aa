"""fifo: the block that arrived in this tier first leaves first; reads do not reorder."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..stats import BlockStats
from .base import EvictionPolicy


@dataclass
class FIFO(EvictionPolicy):
    monotone = True

    def priority(self, key: Hashable, stats: BlockStats) -> int:
        return stats.tier_step
