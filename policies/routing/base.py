"""The routing contract: which replica serves a request, from what each replica reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class RoutingPolicy(ABC):
    """Picks a replica for each request; a pure decision over what the caller measured.

    `loads[i]` is replica i's load (the caller's unit: requests in flight, seconds of queued
    work); `prefix_blocks[i]` is how many leading blocks of the request replica i holds. A
    policy with `uses_prefix = False` is passed None there, so callers skip computing it.
    `choose` returns the index of the replica; policies may keep state (a turn, a seeded
    random generator), so the same calls on a fresh policy give the same answers.
    """

    uses_prefix: ClassVar[bool] = False

    @abstractmethod
    def choose(self, loads: Sequence[float], prefix_blocks: Sequence[int] | None = None) -> int:
        """Index of the replica that serves the request (0 <= index < len(loads))."""


def check_replicas(loads: Sequence[float], prefix_blocks: Sequence[int] | None) -> None:
    """ValueError unless there is a replica and both sequences describe the same replicas."""
    if not loads:
        raise ValueError("routing needs at least one replica")
    if prefix_blocks is not None and len(prefix_blocks) != len(loads):
        raise ValueError(f"{len(prefix_blocks)} prefix lengths for {len(loads)} replicas")


def least_loaded(loads: Sequence[float], among: Sequence[int]) -> int:
    """The replica of `among` with the lowest load; the first such on ties."""
    return min(among, key=lambda i: (loads[i], i))
