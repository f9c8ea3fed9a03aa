"""importance: the block with the lowest importance score leaves first; sinks and recent blocks stay.

The score is `BlockStats.score`, which whoever scores blocks (the KV manager, from an
importance estimator) sets through `TieredStore.set_score`, which calls on_update; ties go to
the least recently used. Sink and recent-window protection follows StreamingLLM (Xiao et al., ICLR 2024,
https://arxiv.org/abs/2309.17453).

Keys are read by duck typing, so this package need not import `tiered`: a key with attributes
`namespace`, `layer` and `index`, the last two ints (as tiered.BlockKey has), belongs to the
sequence (namespace, layer) at position `index`; any other hashable key is never protected.
Content-hashed prefix blocks each have a namespace of their own, so each is the newest block of
its "sequence" and stays protected while window_blocks > 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from ..importance.tensors import check_nonnegative_int
from ..stats import BlockStats
from .base import EvictionPolicy


def _sequence_of(key: Hashable) -> tuple[tuple[object, int], int] | None:
    """((namespace, layer), index) of a BlockKey-like key, or None for any other key."""
    namespace = getattr(key, "namespace", None)
    if namespace is None:  # most keys that are not BlockKeys stop here (the simulator's ints)
        return None
    layer, index = getattr(key, "layer", None), getattr(key, "index", None)
    if not isinstance(layer, int) or not isinstance(index, int):
        return None
    return (namespace, layer), index


@dataclass
class ImportanceEviction(EvictionPolicy):
    """Lowest score first. Protected blocks are offered only after every other block, so a tier
    full of them can still make room rather than fail.

    sink_blocks    blocks with index < sink_blocks are protected
    window_blocks  the newest window_blocks indices of each (namespace, layer) this tier has
                   seen are protected; "newest" is the highest index tracked since the tier last
                   held no block of that sequence
    """

    grouped = True  # (score, last use): within a score, last use only grows

    sink_blocks: int = 1
    window_blocks: int = 4

    _newest: dict[tuple[object, int], list[int]] = field(
        init=False, repr=False, default_factory=dict
    )  # [count, highest index]

    def __post_init__(self) -> None:
        check_nonnegative_int("ImportanceEviction", sink_blocks=self.sink_blocks, window_blocks=self.window_blocks)

    def priority(self, key: Hashable, stats: BlockStats) -> tuple[float, int]:
        return (float(stats.score), stats.last_used_step)

    def on_insert(self, key: Hashable, stats: BlockStats) -> None:
        super().on_insert(key, stats)
        where = _sequence_of(key)
        if where is not None:
            entry = self._newest.setdefault(where[0], [0, where[1]])
            entry[0] += 1
            entry[1] = max(entry[1], where[1])

    def on_remove(self, key: Hashable) -> None:
        tracked = key in self._entries
        super().on_remove(key)
        where = _sequence_of(key) if tracked else None
        if where is not None:
            entry = self._newest[where[0]]
            entry[0] -= 1
            if entry[0] == 0:
                del self._newest[where[0]]

    def is_protected(self, key: Hashable) -> bool:
        """Whether `key` is a sink block or in its sequence's recent window right now."""
        where = _sequence_of(key)
        if where is None:
            return False
        sequence, index = where
        entry = self._newest.get(sequence)
        return index < self.sink_blocks or (entry is not None and index > entry[1] - self.window_blocks)

    def candidates(self) -> Iterator[Hashable]:
        """Unprotected keys by (score, last use), then protected keys in the same order."""
        if not self._newest:  # no tracked key belongs to a sequence: none is protected
            return super().candidates()
        return self._protected_last()

    def _protected_last(self) -> Iterator[Hashable]:
        protected = []
        for key in super().candidates():
            if self.is_protected(key):
                protected.append(key)
            else:
                yield key
        yield from protected
