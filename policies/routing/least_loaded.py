"""least-loaded: the replica with the lowest load; the lowest index on ties."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import RoutingPolicy, check_replicas, least_loaded


@dataclass
class LeastLoaded(RoutingPolicy):
    def choose(self, loads: Sequence[float], prefix_blocks: Sequence[int] | None = None) -> int:
        check_replicas(loads, prefix_blocks)
        return least_loaded(loads, range(len(loads)))
