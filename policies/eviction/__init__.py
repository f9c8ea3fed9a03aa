"""Eviction policies by name: `EVICTION` is the registry, `make_eviction` the factory."""

from __future__ import annotations

from .base import EvictionPolicy
from .fifo import FIFO
from .importance import ImportanceEviction
from .lfu import LFU
from .lru import LRU

EVICTION: dict[str, type[EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "fifo": FIFO,
    "importance": ImportanceEviction,
}


def make_eviction(name: str, **kwargs) -> EvictionPolicy:
    """A new policy registered as `name`; ValueError listing the valid names otherwise."""
    cls = EVICTION.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; valid names: {sorted(EVICTION)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for eviction policy {name!r}: {err}") from None


__all__ = ["EVICTION", "EvictionPolicy", "make_eviction"]
