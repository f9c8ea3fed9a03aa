"""sequential: every block of every layer, in order, starting with the next layer (for resume).

When a session resumes from disk all of it is needed, layer by layer: the next layer first,
then the following ones, wrapping around to this step's earlier layers for the next step.
To resume before any step has run, plan with layer = layers - 1: that is the whole session
from layer 0, for the next step.
"""

from __future__ import annotations

from .base import PrefetchPolicy, PrefetchRequest, PrefetchView


class Sequential(PrefetchPolicy):
    def _plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        indices = tuple(range(view.blocks))
        order = list(range(view.layer + 1, view.layers)) + list(range(view.layer + 1))
        return [PrefetchRequest(layer, indices) for layer in order]
