"""Pure decisions over keys, block statistics and tensors: no I/O, no storage, no models."""

from .eviction import EVICTION, EvictionPolicy, make_eviction
from .importance import IMPORTANCE, ImportanceEstimator, key_bounds, make_importance, select_blocks
from .prefetch import PREFETCH, PrefetchPolicy, PrefetchRequest, PrefetchView, make_prefetch
from .stats import BlockStats

__all__ = [
    "EVICTION",
    "IMPORTANCE",
    "PREFETCH",
    "BlockStats",
    "EvictionPolicy",
    "ImportanceEstimator",
    "PrefetchPolicy",
    "PrefetchRequest",
    "PrefetchView",
    "key_bounds",
    "make_eviction",
    "make_importance",
    "make_prefetch",
    "select_blocks",
]
