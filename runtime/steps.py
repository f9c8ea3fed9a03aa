"""How a session's work gets computed: Session's extend and stream are generators of steps.

Each forward a session needs is a Chunk (the next tokens of its sequence, from a position). Whoever
drives the generator computes the chunk, alone (`drive_alone`: what Session.extend and
Session.stream do) or packed with other sessions' chunks into one forward (runtime.step_loop), and
sends back what it computed (Computed). A stream yields the tokens it chooses, as ints, between its
chunks. A driver that could not compute a chunk throws the reason into the generator: BlocksLost
(the session recomputes from the lost block), StepUndone (another sequence's failure undid the step:
compute it again), or any other error (the session undoes the call and re-raises it).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .kv import KVManager
from .kv.manager import BlocksLost
from .model import Model, StepInput


@dataclass(frozen=True)
class Chunk:
    """The next tokens of a sequence to compute; a driver may compute a prefix of them (>= 1)."""

    kv: KVManager  # the sequence's cache
    token_ids: list[int]
    start: int  # position of token_ids[0]
    last_only: bool  # only the last computed token's logits are read

    def step_input(self, tokens: int) -> StepInput:
        """The model's input for the first `tokens` of the chunk."""
        ids = torch.tensor(self.token_ids[:tokens], dtype=torch.int64)  # [tokens]
        return StepInput(ids, torch.arange(self.start, self.start + tokens), self.kv, self.last_only)


@dataclass(frozen=True)
class Computed:
    """What a driver computed of a Chunk."""

    tokens: int  # the first `tokens` of chunk.token_ids
    logits: Tensor  # [tokens, vocab] float32, or [1, vocab] (after the last of them) when chunk.last_only
    seconds: float  # wall time of the forward it was part of


class StepUndone(Exception):
    """The forward a chunk was part of failed for another sequence: the chunk is to be computed again."""


Steps = Generator["Chunk | int", "Computed | None", Any]


def drive_alone(model: Model, steps: Steps) -> Generator[int, None, Any]:
    """Compute every chunk `steps` asks for, one forward each, in this thread; yields the tokens
    it yields and returns what it returns. Closing this generator closes `steps`."""
    advance, argument = steps.send, None
    try:
        while True:
            try:
                item = advance(argument)
            except StopIteration as done:
                return done.value
            if not isinstance(item, Chunk):
                advance, argument = steps.send, None
                yield item
                continue
            try:
                advance, argument = steps.send, compute_alone(model, item)
            except BlocksLost as lost:
                advance, argument = steps.throw, lost
            except BaseException as error:  # the session undoes its call, then re-raises
                advance, argument = steps.throw, error
    finally:
        steps.close()


def compute_alone(model: Model, chunk: Chunk) -> Computed:
    """One forward of all of `chunk`; what it reads is pinned in its store meanwhile."""
    begin_s = time.perf_counter()
    with chunk.kv.store.pinning(chunk.kv.keys()):  # what this forward reads is not pushed out by it
        logits = model.forward_batch([chunk.step_input(len(chunk.token_ids))])[0]
    return Computed(len(chunk.token_ids), logits, time.perf_counter() - begin_s)


def result_of(driver: Generator[int, None, Any]) -> Any:
    """Run a driver of steps that yield no tokens (an extend) to its end; its return value."""
    try:
        token = next(driver)
    except StopIteration as done:
        return done.value
    driver.close()
    raise RuntimeError(f"an extend yielded a token ({token})")
