"""The one factory behind make_eviction, make_importance and make_prefetch."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def build(registry: dict[str, type[T]], kind: str, name: str, **kwargs: Any) -> T:
    """A new instance of the class registered as `name`; ValueError listing the valid names
    otherwise, TypeError naming the variant for arguments it does not take."""
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {sorted(registry)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for {kind} {name!r}: {err}") from None
