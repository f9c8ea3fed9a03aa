"""Cases for attention over quantized blocks, shared by test_attend_quantized.py and the Triton
interpreter check: every code width, odd token counts, GQA, masks, ragged groups."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tiered import KVBlock
from tiered.codecs import make_codec


class Case(NamedTuple):
    name: str
    bits: int
    group: int
    kv_heads: int
    heads: int
    head_dim: int
    n: int  # queries
    tokens: tuple[int, ...]  # per block
    masked: bool  # queries at the last n positions, causal (else no mask)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.tokens[:i]) for i in range(len(self.tokens)))


CASES = [
    Case("int8 gqa3 decode", 8, 64, 3, 9, 64, 1, (64, 64, 64), False),
    Case("int8 odd tokens causal", 8, 64, 2, 4, 64, 5, (64, 37), True),
    Case("int4 gqa2 partial", 4, 64, 2, 4, 32, 1, (64, 63), False),
    Case("int4 ragged groups causal", 4, 6, 1, 2, 12, 3, (20, 7), True),
    Case("int2 g32 causal", 2, 32, 2, 8, 64, 4, (64, 31), True),
    Case("int2 head_dim 20", 2, 32, 1, 3, 20, 1, (9,), False),
]


def make_case(case: Case, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """(q [heads, n, head_dim], payloads of gaussian blocks, q_positions [n] or None). Keys have
    channels of growing scale (KIVI's outlier channels)."""
    generator = torch.Generator().manual_seed(seed)
    codec = make_codec(f"int{case.bits}", group=case.group)
    payloads = []
    for count in case.tokens:
        shape = (case.kv_heads, count, case.head_dim)
        keys = torch.randn(shape, generator=generator) * torch.linspace(0.5, 8.0, case.head_dim)  # [H, T, D]
        values = torch.randn(shape, generator=generator)  # [H, T, D]
        payloads.append(codec.encode(KVBlock(keys, values)).payload)
    q = torch.randn(case.heads, case.n, case.head_dim, generator=generator)  # [heads, n, head_dim]
    total = sum(case.tokens)
    # masked: the first query sits early, so it sees only part of the first block
    positions = torch.tensor([3, *range(total - case.n + 1, total)]) if case.masked else None
    return q, payloads, positions
