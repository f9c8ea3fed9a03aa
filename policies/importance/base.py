"""The importance contract: a score per block from what attention saw, higher is more valuable.

The KV manager keeps one estimator per layer of a sequence and, at every decode step:

    scores = est.score(query, key_min, key_max)      # before attention; changes nothing
    keep = select_blocks(est.block_scores(scores), budget_blocks=..., sink_blocks=..., window_blocks=...)
    ... attention over the kept blocks gives weights [heads, tokens] (0 where not attended) ...
    est.update(query, weights)                       # after attention; only stateful methods keep it
    est.reset()                                      # when the sequence ends or the estimator is reused

Shapes are those of policies/importance/tensors.py. `score` returns [kv_heads, blocks] float32
on the query's device: one row per KV head for methods that score per head, the same row
repeated for those that do not. Stateful methods keep their state on the device of the weights
update() receives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .tensors import blocks_of, check_positive_int, check_query_bounds, check_weights


@dataclass
class ImportanceEstimator(ABC):
    """Scores the blocks of one layer of one sequence.

    block_tokens  tokens per block, to map token weights onto blocks

    `score` is a pure function of its arguments and of what `update` recorded: calling it any
    number of times changes nothing. `update` is a no-op for methods that keep no state.
    A variant implements `_score` (arguments already checked) and, if it keeps state, declares
    `stateful = True` and implements `_update` and `reset`.
    """

    block_tokens: int = 64

    stateful: ClassVar[bool] = False  # whether update() records anything
    needs_weights: ClassVar[bool] = False  # whether score() needs the current query's weights (oracle)

    def __post_init__(self) -> None:
        check_positive_int(type(self).__name__, block_tokens=self.block_tokens)

    def score(
        self,
        query: torch.Tensor,
        key_min: torch.Tensor,
        key_max: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Importance of every block for this query: [kv_heads, blocks] float32, higher keeps.

        query [heads, head_dim]; key_min, key_max [blocks, kv_heads, head_dim]; weights
        [heads, tokens], this very query's attention, is read only by estimators that declare
        `needs_weights` (oracle) and ignored by the others.
        """
        kv_heads, _ = check_query_bounds(query, key_min, key_max)
        blocks = key_min.shape[0]
        if self.needs_weights:
            if weights is None:
                raise ValueError(f"{type(self).__name__}.score needs weights: this query's attention [heads, tokens]")
            check_weights(weights, query.shape[0], blocks, self.block_tokens)
        scores = self._score(query, key_min, key_max, weights)
        if scores.shape != (kv_heads, blocks):
            raise AssertionError(f"{type(self).__name__} returned {tuple(scores.shape)}, expected {(kv_heads, blocks)}")
        return scores.float()

    def update(self, query: torch.Tensor, weights: torch.Tensor) -> None:
        """Record what attention saw at this step: weights [heads, tokens], query [heads, head_dim].

        tokens is the sequence length at this step; weights are 0 on tokens that were not attended.
        """
        if not isinstance(query, torch.Tensor) or query.dim() != 2:
            raise ValueError(f"query must be a tensor of shape [heads, head_dim], got {getattr(query, 'shape', query)}")
        if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or weights.shape[1] == 0:
            raise ValueError(
                f"weights must be a tensor of shape [heads, tokens>0], got {getattr(weights, 'shape', weights)}"
            )
        check_weights(weights, query.shape[0], blocks_of(weights.shape[1], self.block_tokens), self.block_tokens)
        self._update(query, weights)

    def reset(self) -> None:
        """Forget everything update() recorded (a new sequence starts)."""

    def block_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per block from [kv_heads, blocks], to choose blocks shared by all heads: [blocks].

        By default mass_shares(scores); methods that score in logits override this.
        """
        return mass_shares(scores)

    @abstractmethod
    def _score(
        self, query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The method's idea: [kv_heads, blocks] from checked arguments."""

    def _update(self, query: torch.Tensor, weights: torch.Tensor) -> None:
        """Stateless methods keep nothing."""


def mass_shares(scores: torch.Tensor) -> torch.Tensor:
    """[kv_heads, blocks] -> [blocks]: each head's scores read as a distribution of attention over
    blocks (negative parts clamped, normalized to sum 1), averaged over heads. Ranks blocks by
    the expected share of attention they receive; a head whose scores are all 0 adds nothing."""
    mass = scores.float().clamp(min=0)  # [kv_heads, blocks]
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=1e-30), mass).mean(0)
