"""recency: attention sinks plus the most recent blocks.

StreamingLLM: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024, https://arxiv.org/abs/2309.17453. The first tokens soak up attention whatever the
query, and the rest goes mostly to the latest tokens; this keeps both and ignores the query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImportanceEstimator
from .tensors import check_nonnegative_int


@dataclass
class Recency(ImportanceEstimator):
    """Sink blocks score highest, then newer blocks above older ones; the same for every head."""

    sink_blocks: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nonnegative_int("Recency", sink_blocks=self.sink_blocks)

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        blocks, kv_heads = key_min.shape[0], key_min.shape[1]
        scores = torch.arange(1, blocks + 1, dtype=torch.float32, device=query.device)  # [blocks], newer is higher
        scores[: self.sink_blocks] = 2 * blocks + 1
        return scores.expand(kv_heads, blocks).clone()  # [kv_heads, blocks]
