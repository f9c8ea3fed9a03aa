"""Which blocks sparse attention reads: sink blocks, the recent window, then the top-k by score.

The sinks and the window are StreamingLLM's (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks", ICLR 2024, https://arxiv.org/abs/2309.17453); the top-k is the estimator's.
"""

from __future__ import annotations

import torch

from .tensors import check_nonnegative_int


def protected_blocks(blocks: int, sink_blocks: int, window_blocks: int) -> list[int]:
    """Sink blocks (oldest first), then the recent window (newest first), without repeats."""
    sinks = list(range(min(sink_blocks, blocks)))
    window = [i for i in range(blocks - 1, max(blocks - 1 - window_blocks, -1), -1) if i >= len(sinks)]
    return sinks + window


def rank_blocks(block_scores: torch.Tensor) -> torch.Tensor:
    """Block indices by score, highest first; equal scores put the newer block first. [blocks] int64."""
    flipped = block_scores.flip(0)  # newest first, so a stable sort keeps newer blocks ahead on ties
    order = torch.sort(flipped, descending=True, stable=True).indices
    return block_scores.shape[0] - 1 - order


def select_blocks(
    block_scores: torch.Tensor, *, budget_blocks: int, sink_blocks: int = 1, window_blocks: int = 1
) -> torch.Tensor:
    """Indices of the blocks to keep, in priority order: [kept] int64, kept <= budget_blocks.

    block_scores [blocks] (see ImportanceEstimator.block_scores). Sinks come first, then the
    recent window (the newest block, which may be partial, is part of it), then the remaining
    blocks by score (ties: the newer block). When the budget is smaller than sinks + window,
    the protected blocks are cut in that same order. Sort the result before gathering if the
    attention kernel wants ascending positions. The token budget is budget_tokens // block_tokens.
    """
    if not isinstance(block_scores, torch.Tensor) or block_scores.dim() != 1:
        raise ValueError(
            f"block_scores must be a tensor of shape [blocks], got {getattr(block_scores, 'shape', block_scores)}"
        )
    if torch.isnan(block_scores).any():
        raise ValueError("block_scores must not contain NaN")
    check_nonnegative_int(
        "select_blocks", budget_blocks=budget_blocks, sink_blocks=sink_blocks, window_blocks=window_blocks
    )
    protected = protected_blocks(block_scores.shape[0], sink_blocks, window_blocks)
    if budget_blocks <= len(protected):
        return torch.tensor(protected[:budget_blocks], dtype=torch.int64)
    taken = set(protected)
    ranked = [i for i in rank_blocks(block_scores.float()).tolist() if i not in taken]
    return torch.tensor(protected + ranked[: budget_blocks - len(protected)], dtype=torch.int64)


def select_unprotected(
    block_scores: torch.Tensor, *, budget_blocks: int, sink_blocks: int = 1, window_blocks: int = 1
) -> tuple[int, ...]:
    """The top-k part of select_blocks (sinks and window left out), best first."""
    keep = select_blocks(
        block_scores, budget_blocks=budget_blocks, sink_blocks=sink_blocks, window_blocks=window_blocks
    )
    protected = set(protected_blocks(block_scores.shape[0], sink_blocks, window_blocks))
    return tuple(i for i in keep.tolist() if i not in protected)


def select_per_head(
    scores: torch.Tensor, *, budget_blocks: int, sink_blocks: int = 1, window_blocks: int = 1
) -> torch.Tensor:
    """Blocks each KV head keeps, ascending: [kv_heads, kept] int64, kept = min(budget, blocks).

    scores [kv_heads, blocks] (ImportanceEstimator.score). Every head keeps the sinks and the
    recent window (cut in select_blocks' order when the budget is smaller), then its own top
    blocks by its own row, as Quest and kvpress choose per head rather than one set for all.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a tensor of shape [kv_heads, blocks], got {getattr(scores, 'shape', scores)}")
    if torch.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    check_nonnegative_int("select_per_head", budget_blocks=budget_blocks, sink_blocks=sink_blocks, window_blocks=window_blocks)
    kv_heads, blocks = scores.shape
    kept = min(budget_blocks, blocks)
    protected = protected_blocks(blocks, sink_blocks, window_blocks)[:kept]
    ranked = scores.float().clone()  # [kv_heads, blocks]
    ranked[:, protected] = float("inf")
    return torch.topk(ranked, kept, dim=1, sorted=False).indices.sort(dim=1).values
