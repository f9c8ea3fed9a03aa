"""snapkv: votes of an observation window of the latest queries, pooled over neighbouring tokens.

SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS
2024, https://arxiv.org/abs/2404.14469. The attention of the last few queries over the
context predicts what later queries read; pooling each token's votes with its neighbours keeps
the context around a voted token, and GQA models average the votes of a group's query heads.
The votes are the attention weights those queries produced (softmax of q·k over the keys), as
update() receives them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import ImportanceEstimator
from .tensors import block_sums, check_positive_int, group_heads


@dataclass
class SnapKV(ImportanceEstimator):
    """Σ over the window of each query's attention per token, pooled, group-averaged, summed per block.

    window       how many of the latest queries vote
    kernel_size  odd width, in tokens, of the pooling over neighbouring positions (1: none)
    pooling      "max" or "avg"
    """

    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    stateful = True
    _rows: deque = field(init=False, repr=False)  # of [heads, tokens_i], the latest `window` updates

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("SnapKV", window=self.window, kernel_size=self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"SnapKV.kernel_size must be odd, got {self.kernel_size}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"SnapKV.pooling must be 'max' or 'avg', got {self.pooling!r}")
        self._rows = deque(maxlen=self.window)

    def reset(self) -> None:
        self._rows.clear()

    def _update(self, query, weights) -> None:
        if self._rows and self._rows[-1].shape[0] != weights.shape[0]:
            raise ValueError(f"weights have {weights.shape[0]} heads; earlier updates had {self._rows[-1].shape[0]}")
        self._rows.append(weights.detach().float().clone())

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        heads, (blocks, kv_heads) = query.shape[0], key_min.shape[:2]
        tokens = blocks * self.block_tokens
        votes = torch.zeros(heads, tokens, device=query.device)  # [heads, tokens]
        for row in self._rows:
            if row.shape[0] != heads:
                raise ValueError(f"query has {heads} heads; the recorded attention has {row.shape[0]}")
            seen = min(row.shape[1], tokens)
            votes[:, :seen] += row[:, :seen].to(votes.device)
        pad = self.kernel_size // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(votes[None], self.kernel_size, stride=1, padding=pad)[0]
        else:
            pooled = F.avg_pool1d(votes[None], self.kernel_size, stride=1, padding=pad, count_include_pad=False)[0]
        return block_sums(group_heads(pooled, kv_heads, "mean"), self.block_tokens, blocks)
