"""tova: the latest query's attention, averaged over the heads of a KV group.

TOVA: Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104.
After each step, TOVA drops whatever the current query attended to least. Blocks are chosen
before the next query exists, so the score is the attention of the query seen last by update().
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import ImportanceEstimator
from .tensors import block_mass, group_heads


@dataclass
class TOVA(ImportanceEstimator):
    """Per KV head, the mean over its query heads of the last step's attention mass per block."""

    stateful = True
    _last: torch.Tensor | None = field(init=False, default=None, repr=False)  # [heads, blocks]

    def reset(self) -> None:
        self._last = None

    def _update(self, query, weights) -> None:
        if self._last is not None and self._last.shape[0] != weights.shape[0]:
            raise ValueError(f"weights have {weights.shape[0]} heads; earlier updates had {self._last.shape[0]}")
        self._last = block_mass(weights, self.block_tokens)

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        heads, (blocks, kv_heads) = query.shape[0], key_min.shape[:2]
        mass = torch.zeros(heads, blocks, device=query.device)  # [heads, blocks]
        if self._last is not None:
            if self._last.shape[0] != heads:
                raise ValueError(f"query has {heads} heads; the recorded attention has {self._last.shape[0]}")
            known = min(blocks, self._last.shape[1])
            mass[:, :known] = self._last[:, :known]
        return group_heads(mass, kv_heads, "mean")
