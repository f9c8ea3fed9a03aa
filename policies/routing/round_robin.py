"""round-robin: replicas take turns, whatever they hold or how busy they are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import RoutingPolicy, check_replicas


@dataclass
class RoundRobin(RoutingPolicy):
    _turn: int = field(init=False, repr=False, default=0)

    def choose(self, loads: Sequence[float], prefix_blocks: Sequence[int] | None = None) -> int:
        check_replicas(loads, prefix_blocks)
        index = self._turn % len(loads)
        self._turn += 1
        return index
