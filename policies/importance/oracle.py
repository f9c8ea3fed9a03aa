"""oracle: the exact attention mass of the current query per block. For experiments only.

It reads the attention of the very query it scores, which sparse attention cannot have before
it runs; it is the upper limit the other estimators are measured against (the "oracle" of
Quest, Tang et al., ICML 2024, https://arxiv.org/abs/2406.10774, and of H2O's analysis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImportanceEstimator
from .tensors import block_mass, group_heads


@dataclass
class Oracle(ImportanceEstimator):
    """Per KV head, the attention mass its query heads give each block (summed over the group)."""

    needs_weights = True

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        blocks, kv_heads = key_min.shape[:2]
        return group_heads(block_mass(weights, self.block_tokens, blocks), kv_heads, "sum")
