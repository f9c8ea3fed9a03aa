"""Sparse decode attention: each KV head reads the sink pages, the recent window and its own top
pages by an importance estimator, within a token budget.

Selection and storage have different grains. Quest's key bounds are tight over a page of 16
tokens and loose over a 64-token block, so pages are scored and chosen, blocks are stored and
moved: a step reads the union of the blocks its pages lie in, then gathers each head's pages.
Heads choose apart (Quest, kvpress): one set shared by every head loses what only one head needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policies import PrefetchView, make_importance, make_prefetch
from policies.importance import Quest, select_per_head
from policies.prefetch.none import NoPrefetch
from tiered import BlockKey, TieredStore
from tiered.checked import NonNegative, checked
from tiered.codecs import cpu_kernels
from tiered.codecs.attend_reference import merge_partials

from .attention import grouped_attention
from .summaries import KeySummaries


class SparseAttention:
    """Per-layer page summaries and estimators of one sequence, and the sparse step over them.

    page_tokens    selection grain (divides block_tokens)
    budget_tokens  tokens each KV head reads per layer and step (sinks + window + top pages)
    sink_tokens, window_tokens   always read at the start and the end (multiples of page_tokens;
                   the window holds at least the newest page, which has the current token)
    """

    @checked
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        *,
        block_tokens: int,
        page_tokens: NonNegative,
        budget_tokens: NonNegative,
        sink_tokens: NonNegative,
        window_tokens: NonNegative,
        importance: str,
        importance_kwargs: dict | None,
        prefetch: str,
    ) -> None:
        if page_tokens == 0 or block_tokens % page_tokens:
            raise ValueError(f"page_tokens must divide block_tokens={block_tokens}, got {page_tokens}")
        if sink_tokens % page_tokens or window_tokens % page_tokens or window_tokens == 0:
            raise ValueError(
                f"sink_tokens and window_tokens must be multiples of page_tokens={page_tokens}, and the window "
                f"at least one page; got {sink_tokens} and {window_tokens}"
            )
        least = sink_tokens + window_tokens + page_tokens
        if budget_tokens < least:
            raise ValueError(
                f"sparse mode needs budget_tokens >= {least} (sink, window and one more page of {page_tokens} "
                f"tokens), got {budget_tokens}"
            )
        self.block_tokens, self.page_tokens = block_tokens, page_tokens
        self.budget_pages = budget_tokens // page_tokens
        self.sink_pages, self.window_pages = sink_tokens // page_tokens, window_tokens // page_tokens
        self.layers, self.head_dim = layers, head_dim
        self.summaries = [KeySummaries(kv_heads, head_dim, device) for _ in range(layers)]
        importance_kwargs = dict(importance_kwargs or {})
        if importance == "quest":  # rank pages by expected attention share, as softmax(scale * bound)
            importance_kwargs.setdefault("scale", head_dim**-0.5)
        self.estimators = [make_importance(importance, block_tokens=page_tokens, **importance_kwargs) for _ in range(layers)]
        if self.estimators[0].needs_weights:
            raise ValueError(
                f"importance {importance!r} needs the attention it is to predict: use it in `tiered experiment`"
            )
        self.prefetch_policy = make_prefetch(prefetch)
        self.plans_prefetch = not isinstance(self.prefetch_policy, NoPrefetch)  # "none" plans nothing: not asked
        # fp32 on the CPU: kept pages on the device are attended in the pool, not copied out first
        self.fused = device.type == "cpu" and head_dim % 16 == 0 and cpu_kernels.available()

    def add(self, layer: int, start: int, keys: Tensor) -> None:
        """Summarize the keys of tokens start.. of `layer`: [kv_heads, n, head_dim]."""
        self.summaries[layer].add_tokens(start, keys, self.page_tokens)

    def truncate(self, tokens: int) -> None:
        pages = -(-tokens // self.page_tokens)
        for summaries in self.summaries:
            summaries.truncate(pages)
        if tokens == 0:
            for estimator in self.estimators:
                estimator.reset()

    def attend(
        self, store: TieredStore, layer: int, keys: list[BlockKey], tokens: int, q: Tensor, positions: Tensor
    ) -> tuple[Tensor, int, list[tuple[int, int]], Tensor]:
        """One decode step of `layer` over its `tokens` tokens in blocks `keys`.

        q: [heads, 1, head_dim]. Returns the output [heads, 1, head_dim], the tokens each KV head
        read, the (layer, block index) pairs the prefetch policy wants up next, and the estimator's
        scores [kv_heads, pages] (page_scores turns them into one per page).
        """
        estimator, page = self.estimators[layer], self.page_tokens
        pages = -(-tokens // page)
        query = q[:, 0]  # [heads, head_dim]
        key_min, key_max = self.summaries[layer].bounds(pages)  # each [pages, kv_heads, head_dim]
        fused = self.fused and q.dtype == torch.float32 and not estimator.stateful
        if fused and type(estimator) is Quest:  # scores and choice in one call, as the two lines below
            scores, keep = cpu_kernels.quest_select(
                query, key_min, key_max, budget_pages=self.budget_pages, sink_pages=self.sink_pages,
                window_pages=self.window_pages,
            )
        else:
            scores = estimator.score(query, key_min, key_max)  # [kv_heads, pages]
            keep = select_per_head(
                scores, budget_blocks=self.budget_pages, sink_blocks=self.sink_pages, window_blocks=self.window_pages
            )  # [kv_heads, kept], ascending: the newest page, in every head's window, comes last
        read = keep.shape[1] * page - (-tokens % page)
        out = self._attend_in_pool(store, keys, keep, tokens, q) if fused else None
        if out is None:  # the kept pages' keys and values: [kv_heads, read, head_dim] each
            chosen_keys, chosen_values = store.read_pages(keys, keep, page, tokens, touch=True)
            out, weights = grouped_attention(q, chosen_keys, chosen_values, positions, return_weights=estimator.stateful)
        if estimator.stateful:
            kv_heads, group = keep.shape[0], q.shape[0] // keep.shape[0]
            key_positions = (keep.cpu()[..., None] * page + torch.arange(page)).reshape(kv_heads, -1)[:, :read]
            full = torch.zeros(q.shape[0], tokens, dtype=torch.float32)  # [heads, tokens]
            full.scatter_(1, key_positions.repeat_interleave(group, 0), weights[:, 0].float().cpu())
            estimator.update(query.float().cpu(), full)
        wanted = self._plan_prefetch(layer, query, scores, pages) if self.plans_prefetch else []
        return out, read, wanted, scores

    def _attend_in_pool(self, store: TieredStore, keys: list[BlockKey], keep: Tensor, tokens: int, q: Tensor) -> Tensor | None:
        """Attention over the kept pages where they lie: in the device pool (one fused CPU call) and
        in int-quantized blocks below it (the codec's kernel, each head's pages marked), merged by
        log-sum-exp; None when a kept page lies elsewhere (read_pages then gathers them)."""
        scale = self.head_dim**-0.5
        with store.reading_page_rows(keys, keep, self.page_tokens, tokens, touch=True) as rows:
            if rows is None:
                return None
            partials = [cpu_kernels.attend_rows(q, rows.keys_pool, rows.values_pool, rows.first, rows.count, scale)]
            for run in rows.below:
                partials.append(run.codec.attend(q, run.items, run.starts, None, scale, visible=rows.visible,
                                                 page_tokens=self.page_tokens))
        return partials[0][0] if len(partials) == 1 else merge_partials(partials)[0]

    def page_scores(self, layer: int, scores: Tensor) -> Tensor:
        """One score per page ([pages]) from attend's `scores` of `layer`: the estimator's ranking."""
        return self.estimators[layer].block_scores(scores)

    def block_scores(self, layer: int, scores: Tensor, blocks: int) -> Tensor:
        """The best page score of each block ([blocks]) from attend's `scores` of `layer`."""
        page_scores = self.page_scores(layer, scores).cpu()  # [pages]
        per_block = self.block_tokens // self.page_tokens
        padded = page_scores.new_full((blocks * per_block,), float("-inf"))
        padded[: page_scores.numel()] = page_scores
        return padded.view(blocks, per_block).amax(1)

    def _next_bounds(self, layer: int, pages: int) -> tuple[Tensor | None, Tensor | None]:
        """Key bounds ([pages, kv_heads, head_dim] each) of the next layer's pages, or Nones on the last
        layer. At a decode step the next layer has not appended this step's token yet, so it may lack
        the newest page: that one (of the recent window, read anyway) takes its last page's bounds."""
        if layer + 1 >= self.layers:
            return None, None
        summaries = self.summaries[layer + 1]
        held = min(pages, summaries.pages)
        key_min, key_max = summaries.bounds(held)
        if held < pages:
            key_min = torch.cat([key_min, key_min[-1:].expand(pages - held, -1, -1)])
            key_max = torch.cat([key_max, key_max[-1:].expand(pages - held, -1, -1)])
        return key_min, key_max

    def _plan_prefetch(self, layer: int, query: Tensor, scores: Tensor, pages: int) -> list[tuple[int, int]]:
        bounds = self._next_bounds(layer, pages)
        view = PrefetchView(
            layer=layer, layers=self.layers, blocks=pages, query=query.float().cpu(),
            next_key_min=bounds[0], next_key_max=bounds[1], block_scores=self.page_scores(layer, scores).cpu(),
            budget_blocks=self.budget_pages, sink_blocks=self.sink_pages, window_blocks=self.window_pages,
            scale=self.head_dim**-0.5,
        )
        per_block = self.block_tokens // self.page_tokens
        wanted: dict[tuple[int, int], None] = {}  # (layer, block) in order of urgency, no repeats
        for request in self.prefetch_policy.plan(view):
            for p in request.indices:
                wanted.setdefault((request.layer, p // per_block), None)
        return list(wanted)
