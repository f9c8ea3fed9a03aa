"""Pure decisions over keys, block statistics and tensors: no I/O, no storage, no models."""

from .eviction import EVICTION, EvictionPolicy, make_eviction
from .stats import BlockStats

__all__ = ["EVICTION", "BlockStats", "EvictionPolicy", "make_eviction"]
