"""Prefetch policies by name: `PREFETCH` is the registry, `make_prefetch` the factory."""

from __future__ import annotations

from ..registry import build
from .base import PrefetchPolicy, PrefetchRequest, PrefetchView
from .next_layer import NextLayer
from .none import NoPrefetch
from .sequential import Sequential
from .topk import TopK

PREFETCH: dict[str, type[PrefetchPolicy]] = {
    "none": NoPrefetch,
    "topk": TopK,
    "next-layer": NextLayer,
    "sequential": Sequential,
}


def make_prefetch(name: str, **kwargs) -> PrefetchPolicy:
    """A new policy registered as `name`; ValueError listing the valid names otherwise."""
    return build(PREFETCH, "prefetch policy", name, **kwargs)


__all__ = ["PREFETCH", "PrefetchPolicy", "PrefetchRequest", "PrefetchView", "make_prefetch"]
