"""KVManager: one sequence's KV cache as block tables over a TieredStore; the model's AttentionBackend.

Appends write into device-tier slots in place (the last, partial block grows until it is full).
Attention reads blocks where they are: a layer whose blocks sit in consecutive device slots is read
as one view of the pool, anything else is gathered. Two modes:

- exact:  every block takes part; the output equals a full cache's.
- sparse: at decode steps (one new token), the sink blocks, the recent window and the top-k blocks
          by an importance estimator, within `budget_tokens`; kept tokens keep their positions.
          Prefill (several new tokens) attends exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from policies import PrefetchView, make_importance, make_prefetch, select_blocks
from tiered import BlockKey, TieredStore

from .attention import grouped_attention
from .summaries import KeySummaries

MODES = ("exact", "sparse")


@dataclass
class KVCounters:
    appended_tokens: int = 0
    attended_tokens: int = 0  # keys read by attention, summed over layers and steps
    sparse_steps: int = 0  # layer-steps that read a selection rather than every block
    prefetched_blocks: int = 0  # blocks requested from the prefetch scheduler


class KVManager:
    """Block tables per layer for the sequence `namespace` in `store`.

    Implements runtime.model.AttentionBackend: `attend(layer, q, k, v, positions)`.

    mode           "exact" or "sparse"
    budget_tokens  sparse mode: tokens attention reads per layer and step (sinks + window + top-k)
    importance     sparse mode: estimator name (policies.IMPORTANCE)
    prefetch       policy name (policies.PREFETCH) planning which blocks to bring up to the device
    sink_blocks, window_blocks   sparse mode: blocks always kept at the start and the end
    importance_kwargs            sparse mode: arguments of the estimator (quest gets the softmax scale)
    """

    def __init__(
        self,
        store: TieredStore,
        namespace: str,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        mode: str = "exact",
        budget_tokens: int | None = None,
        importance: str = "quest",
        prefetch: str = "none",
        sink_blocks: int = 1,
        window_blocks: int = 2,
        importance_kwargs: dict | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.block_tokens = store.config.block_tokens
        if mode == "sparse":
            if budget_tokens is None or budget_tokens < self.block_tokens * (sink_blocks + window_blocks + 1):
                raise ValueError(
                    f"sparse mode needs budget_tokens >= {self.block_tokens * (sink_blocks + window_blocks + 1)} "
                    f"(sink, window and one more block of {self.block_tokens} tokens), got {budget_tokens}"
                )
        BlockKey(namespace, 0, 0)  # validates the namespace
        self.store = store
        self.namespace = namespace
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.mode = mode
        self.budget_tokens = budget_tokens
        self.sink_blocks, self.window_blocks = sink_blocks, window_blocks
        self.lengths = [0] * layers
        self.block_keys: list[list[BlockKey]] = [[] for _ in range(layers)]
        self.summaries = [KeySummaries(kv_heads, head_dim, store.device) for _ in range(layers)]
        importance_kwargs = dict(importance_kwargs or {})
        if importance == "quest":  # rank blocks by expected attention share, as softmax(scale * bound)
            importance_kwargs.setdefault("scale", head_dim**-0.5)
        self.estimators = [
            make_importance(importance, block_tokens=self.block_tokens, **importance_kwargs) for _ in range(layers)
        ]
        if self.estimators[0].needs_weights:
            raise ValueError(
                f"importance {importance!r} needs the attention it is to predict: use it in `tiered experiment`"
            )
        self.prefetch_policy = make_prefetch(prefetch)
        self.counters = KVCounters()
        self._score_store = store.config.eviction == "importance"

    @property
    def tokens(self) -> int:
        """Tokens every layer holds (the sequence length)."""
        return self.lengths[-1]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Append `k`, `v` to `layer`, then attend. See runtime.model.AttentionBackend."""
        first = int(positions[0])
        if first != self.lengths[layer]:
            raise ValueError(f"layer {layer} holds {self.lengths[layer]} tokens; new tokens must start there, not at {first}")
        self.append(layer, k, v)
        n = q.shape[1]
        if self.mode == "sparse" and n == 1 and self.lengths[layer] > self.budget_tokens:
            return self._attend_sparse(layer, q, positions)
        keys = self.block_keys[layer]
        with self.store.reading(keys, limit_tokens=self.lengths[layer]) as (cached_keys, cached_values):
            out, _ = grouped_attention(q, cached_keys, cached_values, positions)
        self.counters.attended_tokens += self.lengths[layer]
        return out

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write `k`, `v` ([kv_heads, n, head_dim]) after the tokens `layer` holds."""
        length, n, size = self.lengths[layer], k.shape[1], self.block_tokens
        keys, summaries = self.block_keys[layer], self.summaries[layer]
        done = 0
        while done < n:
            index, offset = divmod(length + done, size)
            take = min(size - offset, n - done)
            if index == len(keys):
                keys.append(BlockKey(self.namespace, layer, index))
            part_k, part_v = k[:, done : done + take], v[:, done : done + take]
            self.store.write_tokens(keys[index], offset, part_k, part_v)
            summaries.add(index, part_k, fresh=offset == 0)
            done += take
        self.lengths[layer] += n
        self.counters.appended_tokens += n

    def _attend_sparse(self, layer: int, q: Tensor, positions: Tensor) -> Tensor:
        estimator, summaries = self.estimators[layer], self.summaries[layer]
        blocks = len(self.block_keys[layer])
        query = q[:, 0]  # [heads, head_dim]
        key_min, key_max = summaries.bounds(blocks)  # each [blocks, kv_heads, head_dim]
        block_scores = estimator.block_scores(estimator.score(query, key_min, key_max))  # [blocks]
        budget_blocks = self.budget_tokens // self.block_tokens
        keep = select_blocks(
            block_scores, budget_blocks=budget_blocks, sink_blocks=self.sink_blocks, window_blocks=self.window_blocks
        ).sort().values
        kept_keys = [self.block_keys[layer][i] for i in keep.tolist()]
        # positions of the kept tokens: [kept_tokens]; only the newest (last) block may be partial
        offsets = torch.arange(self.block_tokens)
        key_positions = (keep[:, None] * self.block_tokens + offsets[None, :]).flatten()
        key_positions = key_positions[key_positions < self.lengths[layer]].to(q.device)
        with self.store.reading(kept_keys, touch=True) as (cached_keys, cached_values):
            out, weights = grouped_attention(
                q, cached_keys, cached_values, positions, key_positions, return_weights=estimator.stateful
            )
        if estimator.stateful:
            full = torch.zeros(q.shape[0], self.lengths[layer], dtype=torch.float32)  # [heads, tokens]
            full[:, key_positions.cpu()] = weights[:, 0].cpu()
            estimator.update(query.float().cpu(), full)
        if self._score_store:
            for key, score in zip(self.block_keys[layer], block_scores.tolist()):
                self.store.set_score(key, score)
        self._plan_prefetch(layer, query, block_scores, budget_blocks)
        self.counters.attended_tokens += key_positions.numel()
        self.counters.sparse_steps += 1
        return out

    def _plan_prefetch(self, layer: int, query: Tensor, block_scores: Tensor, budget_blocks: int) -> None:
        blocks = len(self.block_keys[layer])
        nxt = layer + 1 if layer + 1 < self.layers and len(self.block_keys[layer + 1]) >= blocks else None
        bounds = self.summaries[nxt].bounds(blocks) if nxt is not None else (None, None)
        view = PrefetchView(
            layer=layer, layers=self.layers, blocks=blocks, query=query.float().cpu(),
            next_key_min=bounds[0], next_key_max=bounds[1], block_scores=block_scores,
            budget_blocks=budget_blocks, sink_blocks=self.sink_blocks, window_blocks=self.window_blocks,
            scale=self.head_dim**-0.5,
        )
        wanted = [
            self.block_keys[request.layer][i]
            for request in self.prefetch_policy.plan(view)
            for i in request.indices
            if i < len(self.block_keys[request.layer])
        ]
        if wanted:
            self.store.prefetch(wanted)
            self.counters.prefetched_blocks += len(wanted)

    def truncate(self, tokens: int) -> None:
        """Forget every token from `tokens` on, in every layer (undoes a forward that failed midway)."""
        for layer in range(self.layers):
            if self.lengths[layer] <= tokens:
                continue
            keep_blocks = -(-tokens // self.block_tokens)
            for key in self.block_keys[layer][keep_blocks:]:
                self.store.remove(key)
            del self.block_keys[layer][keep_blocks:]
            self.summaries[layer].truncate(keep_blocks)
            self.lengths[layer] = tokens

    def drop(self) -> None:
        """Remove every block of this sequence from the store."""
        for keys in self.block_keys:
            for key in keys:
                self.store.remove(key)
            keys.clear()
        self.lengths = [0] * self.layers
        for summaries in self.summaries:
            summaries.clear()
        for estimator in self.estimators:
            estimator.reset()
