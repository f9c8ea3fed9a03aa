"""The Hugging Face adapter: a transformers `Cache` over a TieredStore. Importing it imports transformers."""

from .cache import TieredCache
from .identity import model_fingerprint
from .layer import TieredLayer

__all__ = ["TieredCache", "TieredLayer", "model_fingerprint"]
