"""h2o: attention mass accumulated per block over the decode steps (heavy hitters).

H2O: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048. A few tokens receive most of
the attention step after step; their accumulated attention finds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import ImportanceEstimator
from .tensors import block_mass, group_heads


@dataclass
class H2O(ImportanceEstimator):
    """Per query head, Σ_steps decay^age · mass(block); per KV head, the mean over its group.

    decay      0 < decay <= 1; 1 is H2O's plain sum, lower forgets old steps
    normalize  divide by the (decayed) number of queries that could see each block, so old
               blocks are not favoured merely for having been visible longer
    """

    decay: float = 1.0
    normalize: bool = False

    stateful = True
    _mass: torch.Tensor | None = field(init=False, default=None, repr=False)  # [heads, blocks]
    _seen: torch.Tensor | None = field(init=False, default=None, repr=False)  # [blocks]

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            raise ValueError(f"H2O.decay must be in (0, 1], got {self.decay!r}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"H2O.normalize must be bool, got {type(self.normalize).__name__}")

    def reset(self) -> None:
        self._mass = None
        self._seen = None

    def _update(self, query, weights) -> None:
        mass = block_mass(weights, self.block_tokens)  # [heads, blocks_now]
        heads, blocks = mass.shape
        if self._mass is None:
            self._mass = mass.new_zeros(heads, blocks)
            self._seen = mass.new_zeros(blocks)
        elif self._mass.shape[0] != heads:
            raise ValueError(f"weights have {heads} heads; earlier updates had {self._mass.shape[0]}")
        if blocks > self._mass.shape[1]:
            self._mass = torch.nn.functional.pad(self._mass, (0, blocks - self._mass.shape[1]))
            self._seen = torch.nn.functional.pad(self._seen, (0, blocks - self._seen.shape[0]))
        self._mass = self._mass * self.decay
        self._mass[:, :blocks] += mass.to(self._mass.device)
        self._seen = self._seen * self.decay
        self._seen[:blocks] += 1

    def _score(self, query, key_min, key_max, weights) -> torch.Tensor:
        heads, (blocks, kv_heads) = query.shape[0], key_min.shape[:2]
        if self._mass is None:
            return torch.zeros(kv_heads, blocks, device=query.device)
        if self._mass.shape[0] != heads:
            raise ValueError(f"query has {heads} heads; the recorded attention has {self._mass.shape[0]}")
        known = min(blocks, self._mass.shape[1])
        mass = torch.zeros(heads, blocks, device=query.device)  # [heads, blocks]; blocks not seen yet score 0
        mass[:, :known] = self._mass[:, :known]
        if self.normalize:
            mass[:, :known] /= self._seen[:known].clamp(min=1e-6).to(query.device)
        return group_heads(mass, kv_heads, "mean")
