"""Runs models and sessions on a TieredStore: the model, KV manager, sessions, workers and CLI."""

from .kv import KVManager
from .model import load_model
from .session import Session

__all__ = ["KVManager", "Session", "load_model"]
