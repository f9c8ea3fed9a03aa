"""The prefetch contract: which blocks of which layer to bring up before attention reads them.

The KV manager calls `plan(view)` right after layer `view.layer` has attended at a decode step
(its estimator already updated), hands the requests to the prefetch scheduler (tiered.scheduler),
and changes nothing else on the policy's account: planning has no side effects. Requests come most
urgent first; blocks already on the device cost nothing.

How soon a request is needed follows from its layer: a layer after `view.layer` is read later in
this decode step, one at or before it at the next step. The scheduler's priority is that distance
in layer computations, (request.layer - view.layer - 1) % layers + 1: 1 for the next layer,
`layers` for this layer at the next step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..importance.tensors import check_nonnegative_int, check_positive_int


@dataclass(frozen=True)
class PrefetchRequest:
    """Bring blocks `indices` (most urgent first) of `layer` up to the device."""

    layer: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class PrefetchView:
    """What the KV manager knows after layer `layer` attended at one decode step.

    layer, layers    this layer, and how many the model has
    blocks           blocks each layer of the sequence holds now
    query            [heads, head_dim] this layer's query at this step (RoPE applied), or the
                     manager's best guess of the next layer's query (InfiniGen computes one)
    next_key_min     [blocks, kv_heads, head_dim] key bounds of layer + 1; None on the last layer
    next_key_max     same shape
    block_scores     [blocks] this layer's estimator ranking for the next step (after update), or None
    budget_blocks    blocks sparse attention keeps per layer (sinks + window + top-k)
    sink_blocks, window_blocks   the protected blocks of that selection
    max_blocks       at most this many indices over all requests; None for no limit
    scale            the attention's softmax scale, for policies that score with Quest
    """

    layer: int
    layers: int
    blocks: int
    query: torch.Tensor
    next_key_min: torch.Tensor | None = None
    next_key_max: torch.Tensor | None = None
    block_scores: torch.Tensor | None = None
    budget_blocks: int = 0
    sink_blocks: int = 1
    window_blocks: int = 1
    max_blocks: int | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("PrefetchView", layers=self.layers)
        check_nonnegative_int(
            "PrefetchView",
            layer=self.layer,
            blocks=self.blocks,
            budget_blocks=self.budget_blocks,
            sink_blocks=self.sink_blocks,
            window_blocks=self.window_blocks,
        )
        if self.layer >= self.layers:
            raise ValueError(f"PrefetchView.layer must be < layers={self.layers}, got {self.layer}")
        if self.max_blocks is not None:
            check_nonnegative_int("PrefetchView", max_blocks=self.max_blocks)
        if not isinstance(self.query, torch.Tensor) or self.query.dim() != 2:
            raise ValueError(
                "PrefetchView.query must be a tensor of shape [heads, head_dim], "
                f"got {getattr(self.query, 'shape', self.query)}"
            )
        if (self.next_key_min is None) != (self.next_key_max is None):
            raise ValueError("PrefetchView.next_key_min and next_key_max must be given together")
        if self.next_key_min is not None and self.next_key_min.shape[0] != self.blocks:
            raise ValueError(
                f"PrefetchView.next_key_min must have blocks={self.blocks} rows, got {tuple(self.next_key_min.shape)}"
            )
        if self.block_scores is not None and tuple(self.block_scores.shape) != (self.blocks,):
            raise ValueError(
                f"PrefetchView.block_scores must have shape [blocks={self.blocks}], "
                f"got {tuple(self.block_scores.shape)}"
            )


class PrefetchPolicy(ABC):
    """Plans prefetches. A variant implements `_plan`; the base drops empty requests and cuts
    the plan to `view.max_blocks` indices."""

    def plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        """Requests, most urgent first, for the state `view` describes. Changes nothing."""
        if not isinstance(view, PrefetchView):
            raise TypeError(f"plan expects a PrefetchView, got {type(view).__name__}")
        left = view.max_blocks
        plan = []
        for request in self._plan(view):
            indices = request.indices if left is None else request.indices[:left]
            if indices:
                plan.append(PrefetchRequest(request.layer, tuple(indices)))
                left = None if left is None else left - len(indices)
        return plan

    def reset(self) -> None:
        """Forget any state (a new sequence starts). The registered policies keep none."""

    @abstractmethod
    def _plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        """The policy's idea: requests from a checked view."""
