"""The Hugging Face adapter: a transformers `Cache` over a TieredStore. Importing it imports transformers."""

from .attention import ATTENTION
from .cache import TieredCache
from .identity import model_fingerprint
from .layer import TieredLayer

__all__ = ["ATTENTION", "TieredCache", "TieredLayer", "model_fingerprint"]
