"""Synthetic request traces with the structure of multi-turn chat: shared system prompts, and
conversations whose every turn resends the whole history plus a new message.

Arrivals of new conversations are Poisson; each conversation's next turn follows its previous
one after an exponential think time. Hash ids are prefix-chained as in Mooncake's traces: a
block's id names its content and everything before it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

from .trace import Trace, TraceRequest


@dataclass(frozen=True)
class SyntheticTrace:
    """What to draw. Lengths in tokens, rates per second, times in seconds."""

    conversations: int = 200
    turns_mean: float = 4.0
    system_prompts: int = 4
    system_tokens: int = 2048
    message_tokens_mean: int = 600
    output_tokens_mean: int = 300
    arrivals_per_s: float = 1.0
    think_s_mean: float = 30.0
    block_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("conversations", "system_prompts", "block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("turns_mean", "message_tokens_mean", "output_tokens_mean", "arrivals_per_s", "think_s_mean"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def synthetic_trace(spec: SyntheticTrace) -> Trace:
    """Draw a trace from `spec` (the same spec gives the same trace)."""
    rng = random.Random(spec.seed)
    ids = itertools.count()
    chain: dict[tuple[int, tuple], int] = {}  # (parent id, content) -> id

    def block_id(parent: int, content: tuple) -> int:
        return chain.setdefault((parent, content), next(ids))

    events: list[tuple[float, int, int]] = []  # (arrival_s, conversation, turn)
    start = 0.0
    for conversation in range(spec.conversations):
        start += rng.expovariate(spec.arrivals_per_s)
        events.append((start, conversation, 0))
    heapq.heapify(events)
    turns = {c: 1 + int(rng.expovariate(1 / max(spec.turns_mean - 1, 1e-9))) for c in range(spec.conversations)}
    system = {c: rng.randrange(spec.system_prompts) for c in range(spec.conversations)}
    history: dict[int, int] = {}  # conversation -> tokens so far
    requests = []
    while events:
        arrival_s, conversation, turn = heapq.heappop(events)
        message = max(1, int(rng.expovariate(1 / spec.message_tokens_mean)))
        output = max(1, int(rng.expovariate(1 / spec.output_tokens_mean)))
        before = history.get(conversation, spec.system_tokens)
        tokens = before + message
        hashes, parent = [], -1
        for index in range(-(-tokens // spec.block_tokens)):
            end = (index + 1) * spec.block_tokens
            if end <= spec.system_tokens:
                content = ("system", system[conversation], index)  # shared by every conversation with this prompt
            elif end <= tokens:
                content = ("full", conversation, index)  # the history only grows: a full block never changes
            else:
                content = ("partial", conversation, turn)  # the last block, filled up by the next turn
            parent = block_id(parent, content)
            hashes.append(parent)
        requests.append(TraceRequest(arrival_s, tokens, output, tuple(hashes)))
        history[conversation] = tokens + output
        if turn + 1 < turns[conversation]:
            heapq.heappush(events, (arrival_s + rng.expovariate(1 / spec.think_s_mean), conversation, turn + 1))
    return Trace(requests, spec.block_tokens, "synthetic")
