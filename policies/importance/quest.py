"""quest: an upper bound of every q·k in a block, from the block's per-channel key min and max.

Quest: Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024, https://arxiv.org/abs/2406.10774. For each channel c, q_c·k_c over the block's keys
is at most max(q_c·min_c, q_c·max_c), so their sum bounds every key's dot product with q. The
summaries stay in the fastest tier, so a block is scored without being in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImportanceEstimator
from .tensors import check_query_bounds, group_heads


def quest_bound(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """Σ_c max(q_c·min_c, q_c·max_c) per query head and block: [heads, blocks].

    query [heads, head_dim]; key_min, key_max [blocks, kv_heads, head_dim]. Query head h reads
    KV head h // group. Computed as q⁺·max + q⁻·min (q⁺, q⁻ the positive and negative parts),
    which picks the larger product channel by channel; float32, or float64 if an input is.
    """
    kv_heads, group = check_query_bounds(query, key_min, key_max)
    dtype = torch.promote_types(torch.promote_types(query.dtype, key_min.dtype), torch.float32)
    q = query.to(dtype).view(kv_heads, group, -1)  # [kv_heads, group, head_dim]
    upper = key_max.to(dtype).permute(1, 2, 0)  # [kv_heads, head_dim, blocks]
    lower = key_min.to(dtype).permute(1, 2, 0)
    bound = q.clamp(min=0) @ upper + q.clamp(max=0) @ lower  # [kv_heads, group, blocks]
    return bound.reshape(kv_heads * group, -1)


@dataclass
class Quest(ImportanceEstimator):
    """Per KV head, the largest bound over the query heads of its group (still a bound for each).

    scale  the attention's softmax scale (usually 1/sqrt(head_dim)). With it, block_scores ranks
           blocks by their expected share of attention, softmax(scale · bound) averaged over
           heads; without it (None), by the largest bound over heads, which needs no scale.
    """

    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None and (
            isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale <= 0
        ):
            raise ValueError(f"Quest.scale must be a positive number or None, got {self.scale!r}")

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        return group_heads(quest_bound(query, key_min, key_max), key_min.shape[1], "max")

    def block_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return scores.float().amax(0)
        return torch.softmax(scores.float() * self.scale, dim=-1).mean(0)
