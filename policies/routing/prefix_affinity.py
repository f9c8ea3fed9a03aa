"""prefix-affinity: the replica holding the longest cached prefix of the request's block hashes.

Load breaks ties between equally long prefixes; a request no replica holds a block of goes to
the least loaded. When the chosen replica's load exceeds the lowest load by more than
`max_imbalance`, affinity gives way to the power of two choices (Mitzenmacher, "The Power of
Two Choices in Randomized Load Balancing", IEEE TPDS 2001): the less loaded of two replicas
drawn at random. This is the rule of Ray Serve's PrefixCacheAffinityRouter and of SGLang's
cache-aware router: follow the cache while the load is balanced, balance the load when not.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import RoutingPolicy, check_replicas, least_loaded


@dataclass
class PrefixAffinity(RoutingPolicy):
    """max_imbalance  load above the least loaded replica's beyond which affinity gives way
    seed           of the random draws of the power of two choices"""

    uses_prefix = True

    max_imbalance: float = 4.0
    seed: int = 0

    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.max_imbalance >= 0:
            raise ValueError(f"PrefixAffinity: max_imbalance must be >= 0, got {self.max_imbalance!r}")
        self._rng = random.Random(self.seed)

    def choose(self, loads: Sequence[float], prefix_blocks: Sequence[int] | None = None) -> int:
        check_replicas(loads, prefix_blocks)
        if prefix_blocks is None:
            raise ValueError("prefix-affinity needs prefix_blocks")
        longest = max(prefix_blocks)
        if longest == 0:
            return least_loaded(loads, range(len(loads)))
        best = least_loaded(loads, [i for i, blocks in enumerate(prefix_blocks) if blocks == longest])
        if loads[best] - min(loads) <= self.max_imbalance or len(loads) == 1:
            return best
        return least_loaded(loads, sorted(self._rng.sample(range(len(loads)), 2)))
