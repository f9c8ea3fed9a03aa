"""Importance estimators by name: `IMPORTANCE` is the registry, `make_importance` the factory."""

from __future__ import annotations

from .base import ImportanceEstimator
from .h2o import H2O
from .oracle import Oracle
from .quest import Quest, quest_bound
from .recency import Recency
from .select import protected_blocks, rank_blocks, select_blocks, select_unprotected
from .snapkv import SnapKV
from .tensors import block_mass, group_heads, key_bounds
from .tova import TOVA

IMPORTANCE: dict[str, type[ImportanceEstimator]] = {
    "recency": Recency,
    "h2o": H2O,
    "tova": TOVA,
    "snapkv": SnapKV,
    "quest": Quest,
    "oracle": Oracle,
}


def make_importance(name: str, **kwargs) -> ImportanceEstimator:
    """A new estimator registered as `name`; ValueError listing the valid names otherwise."""
    cls = IMPORTANCE.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown importance estimator {name!r}; valid names: {sorted(IMPORTANCE)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for importance estimator {name!r}: {err}") from None


__all__ = [
    "IMPORTANCE",
    "ImportanceEstimator",
    "block_mass",
    "group_heads",
    "key_bounds",
    "make_importance",
    "protected_blocks",
    "quest_bound",
    "rank_blocks",
    "select_blocks",
    "select_unprotected",
]
