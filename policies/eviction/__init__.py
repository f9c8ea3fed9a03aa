"""Eviction policies by name: `EVICTION` is the registry, `make_eviction` the factory."""

from __future__ import annotations

from ..registry import build
from .arc import ARC
from .base import EvictionPolicy
from .fifo import FIFO
from .importance import ImportanceEviction
from .lfu import LFU
from .lru import LRU
from .s3fifo import S3FIFO

EVICTION: dict[str, type[EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "fifo": FIFO,
    "importance": ImportanceEviction,
    "s3fifo": S3FIFO,
    "arc": ARC,
}


def make_eviction(name: str, **kwargs) -> EvictionPolicy:
    """A new policy registered as `name`; ValueError listing the valid names otherwise."""
    return build(EVICTION, "eviction policy", name, **kwargs)


__all__ = ["EVICTION", "EvictionPolicy", "make_eviction"]
