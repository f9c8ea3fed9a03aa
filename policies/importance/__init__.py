"""Importance estimators by name: `IMPORTANCE` is the registry, `make_importance` the factory."""

from __future__ import annotations

from ..registry import build
from .base import ImportanceEstimator
from .h2o import H2O
from .oracle import Oracle
from .quest import Quest, quest_bound
from .recency import Recency
from .select import protected_blocks, rank_blocks, select_blocks, select_per_head, select_unprotected
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
    return build(IMPORTANCE, "importance estimator", name, **kwargs)


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
    "select_per_head",
    "select_unprotected",
]
