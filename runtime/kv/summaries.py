"""Per-page key bounds of one layer (Quest's summaries), kept in the fastest memory whatever tier
holds the blocks, so estimators score pages without reading them. A page is `page_tokens`
consecutive tokens; several pages make one storage block."""

from __future__ import annotations

import torch
from torch import Tensor


class KeySummaries:
    """Channel-wise min and max of each page's keys, per KV head: [pages, kv_heads, head_dim]."""

    def __init__(self, kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.kv_heads, self.head_dim, self.device = kv_heads, head_dim, torch.device(device)
        self._min = torch.empty(0, kv_heads, head_dim, device=self.device)  # [capacity, kv_heads, head_dim]
        self._max = torch.empty(0, kv_heads, head_dim, device=self.device)
        self.pages = 0

    def add_tokens(self, start: int, keys: Tensor, page_tokens: int) -> None:
        """Fold the keys of tokens start.. ([kv_heads, n, head_dim]) into their pages of `page_tokens`."""
        n, done = keys.shape[1], 0
        head = min(n, -start % page_tokens)
        if head:  # the rest of a page already begun
            self.add(start // page_tokens, keys[:, :head], fresh=False)
            done = head
        full = (n - done) // page_tokens
        if full:  # whole pages at once: [kv_heads, full, page_tokens, head_dim] reduced over tokens
            grid = keys[:, done : done + full * page_tokens].reshape(keys.shape[0], full, page_tokens, -1)
            first = (start + done) // page_tokens
            if first + full > self._min.shape[0]:
                self._grow(first + full)
            self._min[first : first + full] = grid.amin(2).transpose(0, 1).float().to(self.device)
            self._max[first : first + full] = grid.amax(2).transpose(0, 1).float().to(self.device)
            self.pages = max(self.pages, first + full)
            done += full * page_tokens
        if done < n:  # a new page, begun
            self.add((start + done) // page_tokens, keys[:, done:], fresh=True)

    def add(self, index: int, keys: Tensor, fresh: bool) -> None:
        """Fold `keys` ([kv_heads, n, head_dim]) into page `index`; `fresh` starts the page anew."""
        if index >= self._min.shape[0]:
            self._grow(index + 1)
        low = keys.amin(dim=1).float().to(self.device)  # [kv_heads, head_dim]
        high = keys.amax(dim=1).float().to(self.device)
        if fresh:
            self._min[index], self._max[index] = low, high
        else:
            torch.minimum(self._min[index], low, out=self._min[index])
            torch.maximum(self._max[index], high, out=self._max[index])
        self.pages = max(self.pages, index + 1)

    def bounds(self, pages: int) -> tuple[Tensor, Tensor]:
        """(key_min, key_max) of the first `pages` pages: views, each [pages, kv_heads, head_dim]."""
        if pages > self.pages:
            raise ValueError(f"only {self.pages} pages are summarized, {pages} asked")
        return self._min[:pages], self._max[:pages]

    def truncate(self, pages: int) -> None:
        """Keep the first `pages` pages (a kept partial page's bounds may stay wider: still bounds)."""
        self.pages = min(self.pages, pages)

    def clear(self) -> None:
        self.pages = 0

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._min.shape[0], 16)
        for name in ("_min", "_max"):
            old = getattr(self, name)
            with torch.inference_mode(False):  # plain tensors: updated inside and outside inference mode
                new = torch.empty(capacity, self.kv_heads, self.head_dim, device=self.device)
                new[: old.shape[0]] = old
            setattr(self, name, new)
