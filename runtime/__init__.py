"""Runs models and sessions on a TieredStore: the model, KV manager, sessions, workers and CLI."""

from .kv import KVManager
from .model import load_model
from .session import Session

__all__ = ["Cluster", "KVManager", "Session", "TieredCache", "load_model"]


def __getattr__(name: str):
    # TieredCache imports transformers (the optional `hf` extra): only when it is asked for.
    if name == "TieredCache":
        from .hf import TieredCache

        return TieredCache
    if name == "Cluster":  # imports Ray and Ray Serve: only when it is asked for
        from .cluster import Cluster

        return Cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
