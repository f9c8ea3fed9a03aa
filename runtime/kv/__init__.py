"""The tiered KV manager: a sequence's KV cache over a TieredStore, and the attention that reads it."""

from .attention import grouped_attention
from .manager import KVManager
from .summaries import KeySummaries

__all__ = ["KVManager", "KeySummaries", "grouped_attention"]
