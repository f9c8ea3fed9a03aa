"""Sparse decode steps for TieredCache: past a token budget, each row's layers read the pages an
importance estimator picks per KV head (runtime.kv.sparse.SparseAttention), under the "tiered" attention.
Every block stays in the store; a step reads the budget, not the history."""

from __future__ import annotations

import torch

from runtime.kv.sparse import SparseAttention
from tiered import BlockKey, TieredStore

OPTIONS = ("budget_tokens", "importance", "page_tokens", "sink_tokens", "window_tokens", "dense_layers",
           "importance_kwargs")


class SparseRows:
    """One SparseAttention (page summaries and estimators of every layer) per batch row.

    options: budget_tokens (required: tokens each KV head reads per layer and step), importance
    ("quest"), page_tokens (16), sink_tokens (16), window_tokens (32), dense_layers (2: the first
    layers attend exactly), importance_kwargs, as runtime.KVManager takes them.
    """

    def __init__(self, options: dict, layers: int, kv_heads: int, head_dim: int, block_tokens: int,
                 device: torch.device) -> None:
        if not isinstance(options, dict):
            raise TypeError(f"sparse must be a dict of options {OPTIONS}, got {type(options).__name__}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown sparse options {unknown}; known: {list(OPTIONS)}")
        budget, dense = options.get("budget_tokens"), options.get("dense_layers", 2)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"sparse needs budget_tokens, a positive int (tokens read per KV head and layer), got {budget!r}")
        if isinstance(dense, bool) or not isinstance(dense, int) or dense < 0:
            raise ValueError(f"sparse dense_layers must be an int >= 0, got {dense!r}")
        self.budget_tokens, self.dense_layers = budget, dense
        self._shape = (layers, kv_heads, head_dim, device)
        page = options.get("page_tokens", 16)
        self._options = dict(
            block_tokens=block_tokens, page_tokens=min(page, block_tokens) if isinstance(page, int) else page,
            budget_tokens=budget, sink_tokens=options.get("sink_tokens", 16),
            window_tokens=options.get("window_tokens", 32), importance=options.get("importance", "quest"),
            importance_kwargs=options.get("importance_kwargs"), prefetch="none",
        )
        self._make()  # bad options fail here, when the cache is made
        self.rows: list[SparseAttention] = []

    def _make(self) -> SparseAttention:
        return SparseAttention(*self._shape, **self._options)

    def add(self, row: int, layer: int, start: int, keys: torch.Tensor) -> None:
        """Summarize row `row`'s keys of tokens start.. of `layer` ([kv_heads, n, head_dim])."""
        while len(self.rows) <= row:
            self.rows.append(self._make())
        self.rows[row].add(layer, start, keys)

    def truncate(self, tokens: int) -> None:
        """Every row now holds its first `tokens` tokens."""
        for sparse in self.rows:
            sparse.truncate(tokens)

    def clear(self) -> None:
        self.rows = []

    def reads_sparse(self, layer: int, tokens: int) -> bool:
        return layer >= self.dense_layers and tokens > self.budget_tokens

    def attend(self, row: int, store: TieredStore, layer: int, keys: list[BlockKey], tokens: int, q: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Row `row`'s decode step of `layer` over its chosen pages. q: [heads, 1, head_dim]; returns
        [heads, 1, head_dim]."""
        return self.rows[row].attend(store, layer, keys, tokens, q, positions)[0]
