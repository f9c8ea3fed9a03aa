"""Grouped-query attention over keys and values read from the tiered store.

Query heads are grouped by the KV head they read, so K and V are never repeated per query head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grouped_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    q_positions: Tensor,
    k_positions: Tensor | None = None,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Causal attention of new queries over keys at known positions.

    q: [heads, n, head_dim]; keys, values: [kv_heads, S, head_dim]; q_positions: [n] int64.
    k_positions: [S] int64, the position of each key; None means keys are positions 0..S-1.
    Query head h reads KV head h // (heads // kv_heads); a key is visible to a query at or after
    its position. Scale 1/sqrt(head_dim), softmax in float32.

    Returns the output [heads, n, head_dim] in q's dtype, and with `return_weights` the softmax
    weights [heads, n, S] (float32).
    """
    heads, n, head_dim = q.shape
    kv_heads, total, _ = keys.shape
    group = heads // kv_heads
    grouped = q.reshape(kv_heads, group * n, head_dim)  # [kv_heads, group * n, head_dim]
    scores = torch.matmul(grouped, keys.transpose(1, 2)).float()  # [kv_heads, group * n, S]
    scores.mul_(1.0 / math.sqrt(head_dim))
    if n > 1 or k_positions is not None:
        key_positions = torch.arange(total, device=q.device) if k_positions is None else k_positions
        hidden = key_positions[None, :] > q_positions[:, None]  # [n, S]
        scores.view(kv_heads, group, n, total).masked_fill_(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights.to(values.dtype), values)  # [kv_heads, group * n, head_dim]
    out = out.view(heads, n, head_dim)
    return out, (weights.view(heads, n, total) if return_weights else None)
