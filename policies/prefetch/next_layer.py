"""next-layer: this layer's query scores the next layer's blocks, which come up while this layer runs.

InfiniGen: Lee et al., "InfiniGen: Efficient Generative Inference of Large Language Models
with Dynamic KV Cache Management", OSDI 2024, https://arxiv.org/abs/2406.19707. Attention
inputs of consecutive layers are alike, so layer L can speculate which of layer L+1's blocks
attention will read. The blocks are scored with Quest's bound over layer L+1's key summaries
(which stay in the fastest tier), so no block has to be in memory to be chosen.
"""

from __future__ import annotations

from ..importance.quest import Quest
from ..importance.select import select_unprotected
from .base import PrefetchPolicy, PrefetchRequest, PrefetchView


class NextLayer(PrefetchPolicy):
    def _plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        if view.layer + 1 >= view.layers or view.blocks == 0:
            return []
        if view.next_key_min is None:
            raise ValueError("next-layer prefetch needs view.next_key_min/next_key_max, the next layer's key bounds")
        quest = Quest(scale=view.scale)
        scores = quest.block_scores(quest.score(view.query, view.next_key_min, view.next_key_max))  # [blocks]
        indices = select_unprotected(
            scores, budget_blocks=view.budget_blocks, sink_blocks=view.sink_blocks, window_blocks=view.window_blocks
        )
        return [PrefetchRequest(view.layer + 1, indices)]
