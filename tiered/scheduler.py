"""The prefetch scheduler: which blocks move up when, and the mover that moves them.

A plan (one `TieredStore.prefetch` call) asks for blocks, each with a Priority: how soon
attention reads it (layers ahead) and how important the estimator thinks it is. One Move per
block: a request for a block already queued or moving joins that Move (one Future) and raises
its priority if it is more urgent. A newer plan under the same name (a sequence's next plan)
supersedes the older one: the older plan's queued moves that the newer one does not ask for are
cancelled. A read that needs a block still queued makes it urgent and waits for it (the time is
counted as stall), or, if it can read the block where it lies, cancels the move. Moves run one at
a time, most urgent first, on one background mover.

The scheduler decides when; the store's `move(key, protected)` callback does a move (through
Placement, under the store's lock but for reading the disk tier) and says what it did: MOVED, UP (on the device already), or
SKIPPED (gone, being read, or no room without evicting a protected block). Blocks a plan's moves
found up or moved up are protected from its later moves, so a plan fills the device in its own
order of urgency. An exception from the callback fails that Move: it is counted and carried by the
Move's Future and its plans' Futures, and the block stays where it lies.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterable
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass, field

from .block import BlockKey
from .counters import SchedulerCounters

IDLE_S = 1.0  # the mover thread ends after this long without work (the next request starts another)
QUEUED, RUNNING, DONE = "queued", "running", "done"
MOVED, UP, SKIPPED = "moved", "up", "skipped"  # what a move did: moved the block, found it up already, nothing


@dataclass(frozen=True, slots=True)
class Priority:
    """How urgent a block is. Smaller `layers_ahead` first, then higher `score`, then request order.

    layers_ahead  layer computations until attention reads the block: 1 = the next layer,
                  `layers` = this layer at the next decode step; 0 = a read is waiting for it now
    score         the importance estimate of the block (any scale; only the order matters)
    """

    layers_ahead: int = 1
    score: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.layers_ahead, bool) or not isinstance(self.layers_ahead, int) or self.layers_ahead < 0:
            raise ValueError(f"Priority.layers_ahead must be an int >= 0, got {self.layers_ahead!r}")
        if not isinstance(self.score, (int, float)) or self.score != self.score:
            raise ValueError(f"Priority.score must be a number, got {self.score!r}")

    @property
    def rank(self) -> tuple[int, float]:
        return (self.layers_ahead, -float(self.score))


NOW = Priority(0, float("inf"))  # a read waits for the block: ahead of every plan


@dataclass(eq=False)
class Move:
    """One block on its way up; every request for it shares `future` (MOVED, UP or SKIPPED)."""

    key: BlockKey
    rank: tuple[int, float]
    future: Future = field(default_factory=Future)
    plans: set[_Plan] = field(default_factory=set)
    awaited: bool = False  # a read waits for it: no plan can cancel it
    state: str = QUEUED


@dataclass(eq=False)
class _Plan:
    """One prefetch call: its Future resolves to the blocks its moves moved, once all are settled
    (or it was superseded); to the first error instead if one of its moves failed."""

    name: Hashable | None
    protected: set[BlockKey]  # blocks it moved up or found up: its later moves do not evict them
    future: Future = field(default_factory=Future)
    moves: set[Move] = field(default_factory=set)
    moved: int = 0
    error: BaseException | None = None
    done: bool = False  # settled: its Future is (about to be) resolved

    def settle(self, move: Move, outcome: str, error: BaseException | None) -> bool:
        """Detach `move`; True once, when no move is left (the caller then resolves the Future)."""
        self.moves.discard(move)
        self.moved += outcome == MOVED
        if outcome in (MOVED, UP):
            self.protected.add(move.key)
        if error is not None and self.error is None:
            self.error = error
        return self.close_if_empty()

    def close_if_empty(self) -> bool:
        if self.moves or self.done:
            return False
        self.done = True
        return True


class Scheduler:
    """A priority queue of block moves and the thread that runs them.

    The mover is a thread on CPU. On CUDA it is the place that would own a copy stream: each move
    would run under `torch.cuda.stream(copy_stream)` and record an event, and a waiting read would
    wait on that event instead of the Future. That path needs a GPU to test, so it is not written.
    """

    def __init__(self, move: Callable[[BlockKey, Collection[BlockKey]], str], name: str = "tiered-mover") -> None:
        self._move = move
        self.counters = SchedulerCounters()
        self._cond = threading.Condition()
        self._heap: list[tuple[tuple[int, float], int, Move]] = []  # (rank, order, move); stale entries skipped
        self._order = itertools.count()
        self._moves: dict[BlockKey, Move] = {}  # queued or running, by key
        self._plans: dict[Hashable, _Plan] = {}  # the live plan of each name, until it settles
        self._waiting_reads = 0
        self._closed = False
        self._name = name
        self._thread: threading.Thread | None = None  # started by the first request, ends when idle

    def submit(self, requests: Iterable[tuple[BlockKey, Priority]], plan: Hashable | None = None) -> Future:
        """Queue a move up for each (key, priority); returns the plan's Future (blocks moved).

        `plan` names whose plan this is (a sequence, and the layer that planned): it supersedes
        the live plan of that name, whose queued moves not asked for again are cancelled. Blocks
        the plan has moved up or found up are protected from its later moves.
        """
        new = _Plan(plan, set())
        cancelled: list[Move] = []
        resolved: list[_Plan] = []
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            old = self._plans.get(plan) if plan is not None else None
            if plan is not None:
                self._plans[plan] = new
            for key, priority in requests:
                self.counters.requested_blocks += 1
                move = self._moves.get(key)
                if move is None:
                    move = self._moves[key] = Move(key, priority.rank)
                    self._push(move)
                elif new in move.plans:
                    continue  # asked twice in one plan
                else:
                    self.counters.joined_requests += 1
                    if move.state == QUEUED and priority.rank < move.rank:
                        move.rank = priority.rank
                        self._push(move)
                move.plans.add(new)
                new.moves.add(move)
            if old is not None:
                cancelled = self._supersede(old)
                if old.close_if_empty():
                    resolved.append(old)
            if new.close_if_empty():
                resolved.append(new)
            self._forget(resolved)
            if self._heap and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        _finish(cancelled, resolved)
        return new.future

    def wait_for(self, keys: Iterable[BlockKey], take_queued: bool = False) -> float:
        """Wait until no move of `keys` is queued or running (queued ones become urgent first);
        the seconds waited, which are counted as stall. With `take_queued` a queued move of `keys`
        that no other read waits for is cancelled instead (the reader reads the block where it
        lies), and only running ones are waited for. Call it without the store's lock."""
        taken: list[Move] = []
        resolved: list[_Plan] = []
        with self._cond:
            if not self._moves:
                return 0.0
            waiting = [self._moves[key] for key in keys if key in self._moves]
            if take_queued:
                taken = [move for move in waiting if move.state == QUEUED and not move.awaited]
                resolved = self._drop(taken)
                self._forget(resolved)
                waiting = [move for move in waiting if move.state != DONE]
            for move in waiting:
                move.awaited = True
                if move.state == QUEUED and NOW.rank < move.rank:
                    move.rank = NOW.rank
                    self._push(move)
            if waiting:
                self._waiting_reads += 1
                self._cond.notify()
        _finish(taken, resolved)
        if not waiting:
            return 0.0
        start_s = time.perf_counter()
        wait([move.future for move in waiting])
        waited_s = time.perf_counter() - start_s
        with self._cond:
            self._waiting_reads -= 1
            self.counters.stall_s += waited_s
            self.counters.stalled_reads += 1
        return waited_s

    def counters_now(self) -> dict:
        """The counters (SchedulerCounters), the moves queued or running now and the reads waiting now."""
        with self._cond:
            return {**self.counters.as_dict(), "queued_blocks": len(self._moves), "waiting_reads": self._waiting_reads}

    def close(self) -> None:
        """Cancel every queued move, let the running one finish, stop the mover. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            cancelled = [move for move in self._moves.values() if move.state == QUEUED]
            resolved = self._drop(cancelled)
            self._forget(resolved)
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        _finish(cancelled, resolved)
        if thread is not None:
            thread.join()

    # -- internals ----------------------------------------------------------------------------

    def _push(self, move: Move) -> None:
        heapq.heappush(self._heap, (move.rank, next(self._order), move))

    def _forget(self, settled: list[_Plan]) -> None:
        """Settled plans are no longer live (lock held)."""
        for plan in settled:
            if plan.name is not None and self._plans.get(plan.name) is plan:
                del self._plans[plan.name]

    def _supersede(self, old: _Plan) -> list[Move]:
        """Detach `old` from its moves (lock held); cancel queued ones nobody else wants."""
        orphans = []
        for move in list(old.moves):
            move.plans.discard(old)
            old.moves.discard(move)
            if move.state == QUEUED and not move.plans and not move.awaited:
                orphans.append(move)
        self._drop(orphans)
        return orphans

    def _drop(self, moves: list[Move]) -> list[_Plan]:
        """Forget queued `moves` as cancelled (lock held); the plans this settles."""
        resolved = []
        for move in moves:
            move.state = DONE
            del self._moves[move.key]
            self.counters.cancelled_blocks += 1
            for plan in move.plans:
                if plan.settle(move, SKIPPED, None):
                    resolved.append(plan)
            move.plans.clear()
        return resolved

    def _next(self) -> Move | None:
        """The most urgent queued move, now running; None once closed or idle for IDLE_S (lock held:
        the thread then ends, and a request starts another)."""
        while True:
            while not self._heap and not self._closed:
                if not self._cond.wait(IDLE_S) and not self._heap:
                    self._thread = None
                    return None
            if self._closed:
                return None
            rank, _, move = heapq.heappop(self._heap)
            if move.state == QUEUED and rank == move.rank:  # else a stale entry
                move.state = RUNNING
                return move

    def _run(self) -> None:
        while True:
            with self._cond:
                move = self._next()
                if move is None:
                    return
                plans = list(move.plans)
                protected = plans[0].protected if len(plans) == 1 else set().union(*(p.protected for p in plans))
            move.future.set_running_or_notify_cancel()
            outcome, error = SKIPPED, None
            try:
                outcome = self._move(move.key, protected)
            except Exception as caught:  # a failed move is counted and carried, never lost
                error = caught
            with self._cond:
                move.state = DONE
                del self._moves[move.key]
                if error is not None:
                    self.counters.failed_blocks += 1
                    self.counters.last_error = f"{move.key}: {type(error).__name__}: {error}"
                elif outcome == MOVED:
                    self.counters.moved_blocks += 1
                elif outcome == UP:
                    self.counters.up_blocks += 1
                else:
                    self.counters.skipped_blocks += 1
                resolved = [plan for plan in move.plans if plan.settle(move, outcome, error)]
                move.plans.clear()
                self._forget(resolved)
            if error is not None:
                move.future.set_exception(error)
            else:
                move.future.set_result(outcome)
            _finish([], resolved)


def _finish(cancelled: list[Move], resolved: list[_Plan]) -> None:
    """Resolve Futures outside the scheduler's lock (their callbacks may call back into it)."""
    for move in cancelled:
        move.future.cancel()
    for plan in resolved:
        try:
            if plan.error is not None:
                plan.future.set_exception(plan.error)
            else:
                plan.future.set_result(plan.moved)
        except InvalidStateError:  # the caller cancelled it
            pass
