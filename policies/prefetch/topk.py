"""topk: the blocks this layer's estimator ranks highest, for this layer at the next decode step.

The estimator's ranking after this step's update (`view.block_scores`) predicts the next
step's selection; the sinks and the recent window are left out, as attention keeps them on
the device anyway.
"""

from __future__ import annotations

from ..importance.select import select_unprotected
from .base import PrefetchPolicy, PrefetchRequest, PrefetchView


class TopK(PrefetchPolicy):
    def _plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        if view.block_scores is None:
            raise ValueError("topk prefetch needs view.block_scores, the estimator's ranking for the next step")
        indices = select_unprotected(
            view.block_scores,
            budget_blocks=view.budget_blocks,
            sink_blocks=view.sink_blocks,
            window_blocks=view.window_blocks,
        )
        return [PrefetchRequest(view.layer, indices)]
