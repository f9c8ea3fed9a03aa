"""Pure decisions over keys, block statistics and tensors: no I/O, no storage, no models."""

from .eviction import EVICTION, EvictionPolicy, make_eviction
from .importance import IMPORTANCE, ImportanceEstimator, key_bounds, make_importance, select_blocks
from .prefetch import PREFETCH, PrefetchPolicy, PrefetchRequest, PrefetchView, make_prefetch
from .routing import ROUTING, RoutingPolicy, make_routing
from .stats import BlockStats
from .write import WRITE, WritePolicy, make_write

__all__ = [
    "EVICTION",
    "IMPORTANCE",
    "PREFETCH",
    "ROUTING",
    "WRITE",
    "BlockStats",
    "EvictionPolicy",
    "ImportanceEstimator",
    "PrefetchPolicy",
    "PrefetchRequest",
    "PrefetchView",
    "RoutingPolicy",
    "WritePolicy",
    "key_bounds",
    "make_eviction",
    "make_importance",
    "make_prefetch",
    "make_routing",
    "make_write",
    "select_blocks",
]
