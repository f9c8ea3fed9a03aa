"""Per-block key bounds of one layer (Quest's summaries), kept in the fastest memory whatever tier
holds the blocks, so estimators score blocks without reading them."""

from __future__ import annotations

import torch
from torch import Tensor


class KeySummaries:
    """Channel-wise min and max of each block's keys, per KV head: [blocks, kv_heads, head_dim]."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.kv_heads, self.head_dim, self.device = kv_heads, head_dim, torch.device(device)
        self._min = torch.empty(0, kv_heads, head_dim, device=self.device)  # [capacity, kv_heads, head_dim]
        self._max = torch.empty(0, kv_heads, head_dim, device=self.device)
        self.blocks = 0

    def add(self, index: int, keys: Tensor, fresh: bool) -> None:
        """Fold `keys` ([kv_heads, n, head_dim]) into block `index`; `fresh` starts the block anew."""
        if index >= self._min.shape[0]:
            self._grow(index + 1)
        low = keys.amin(dim=1).float().to(self.device)  # [kv_heads, head_dim]
        high = keys.amax(dim=1).float().to(self.device)
        if fresh:
            self._min[index], self._max[index] = low, high
        else:
            torch.minimum(self._min[index], low, out=self._min[index])
            torch.maximum(self._max[index], high, out=self._max[index])
        self.blocks = max(self.blocks, index + 1)

    def bounds(self, blocks: int) -> tuple[Tensor, Tensor]:
        """(key_min, key_max) of the first `blocks` blocks: views, each [blocks, kv_heads, head_dim]."""
        if blocks > self.blocks:
            raise ValueError(f"only {self.blocks} blocks are summarized, {blocks} asked")
        return self._min[:blocks], self._max[:blocks]

    def truncate(self, blocks: int) -> None:
        """Keep the first `blocks` blocks (a kept partial block's bounds may stay wider: still bounds)."""
        self.blocks = min(self.blocks, blocks)

    def clear(self) -> None:
        self.blocks = 0

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._min.shape[0], 16)
        for name in ("_min", "_max"):
            old = getattr(self, name)
            new = torch.empty(capacity, self.kv_heads, self.head_dim, device=self.device)
            new[: old.shape[0]] = old
            setattr(self, name, new)
