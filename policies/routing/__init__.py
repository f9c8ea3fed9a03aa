"""Routing policies by name: `ROUTING` is the registry, `make_routing` the factory."""

from __future__ import annotations

from ..registry import build
from .base import RoutingPolicy
from .least_loaded import LeastLoaded
from .prefix_affinity import PrefixAffinity
from .round_robin import RoundRobin

ROUTING: dict[str, type[RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
    "prefix-affinity": PrefixAffinity,
}


def make_routing(name: str, **kwargs) -> RoutingPolicy:
    """A new policy registered as `name`; ValueError listing the valid names otherwise."""
    return build(ROUTING, "routing policy", name, **kwargs)


__all__ = ["ROUTING", "RoutingPolicy", "make_routing"]
