"""lfu: the block read least often leaves first; ties go to the least recently used."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..stats import BlockStats
from .base import EvictionPolicy


@dataclass
class LFU(EvictionPolicy):
    grouped = True  # (hits, last use): within a hit count, last use only grows
    def priority(self, key: Hashable, stats: BlockStats) -> tuple[int, int]:
        return (stats.hits, stats.last_used_step)
