"""The interface between the decoder and whatever holds its KV cache (DenseKV, the tiered KV manager)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AttentionBackend(Protocol):
    """Stores one sequence's keys and values per layer and computes attention over them."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Append `k`, `v` to `layer`'s cache, then return the attention of the new queries over every
        cached token and the new ones.

        q: [heads, n, head_dim]; k, v: [kv_heads, n, head_dim] for n new tokens, RoPE already applied
        to q and k. positions: [n] int64 absolute positions of the new tokens, contiguous and continuing
        the sequence. Causal: new token i sees the cached tokens and new tokens <= i. Scale
        1/sqrt(head_dim); query head h reads kv head h // (heads // kv_heads).
        Returns [heads, n, head_dim] in q's dtype."""
        ...
