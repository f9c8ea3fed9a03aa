"""StepLoop: continuous batching of the sessions of one model, one forward step at a time.

A request (an extend, or a stream of generated tokens) joins the running batch at the next step and
leaves when it finishes (a stop token, `max_new_tokens`, the end of its prompt, a cancel), without
waiting for the others. Each step packs every running request's next chunk, shortest first within
`step_tokens` (chunked prefill, as vLLM's scheduler does): the decodes' one token each, then the
short prefills (a new turn of a conversation whose earlier turns are cached), then the long ones,
by arrival among equals. So a long prompt does not stall the others' decodes, and a reused turn's
few tokens do not queue behind another conversation's long prompt (its time to first token is a
step, not that prompt's prefill); a long prefill takes what the short ones leave of each step.
The model computes them in one forward (Model.forward_batch): the matrix multiplications once,
attention per sequence over its own blocks, exact and sparse sessions alike. The sessions of one
worker share one store, so they compete for its tiers under one eviction policy; what every running
session reads is pinned while a step runs.

Session.extend and Session.stream compute the same steps alone (runtime.steps); a session's
tokens are the same either way (greedy: the same tokens; the logits agree to float rounding).

A plain class: the caller drives it with `step()` or `run()`. runtime/cluster/replica.py runs it
on a thread of its own and streams tokens back; other threads submit and cancel.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

from torch import Tensor

from tiered.checked import Positive, checked

from .kv.manager import BlocksLost
from .model import Model
from .session import Session
from .steps import Chunk, Computed, Steps, StepUndone

DEFAULT_STEP_TOKENS = 512
DEFAULT_MAX_SEQUENCES = 64


class _End:
    """The last event of a request: what its steps returned, or the error that ended them."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class Request:
    """One call running in a StepLoop: an extend (`result()`) or a stream (`tokens()`).

    `notify`, if set, is called from the loop's thread after each new event (a token, the end):
    an asyncio consumer sets it to wake its event loop, then reads with `poll()`."""

    def __init__(self, session: Session, steps: Steps) -> None:
        self.session = session
        self.notify: Callable[[], None] | None = None
        self.cancelled = False
        self.finished = False  # the loop is done with it (its last event is queued)
        self._steps = steps
        self._chunk: Chunk | None = None  # the chunk it waits on
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # ints, then one _End
        self._ended = False  # the consumer has seen the _End

    def tokens(self, timeout_s: float | None = None) -> Iterator[int]:
        """Yield the stream's tokens as the loop produces them (blocking), then raise its error if
        it failed. Another thread must drive the loop, or it must have run already."""
        while not self._ended:
            try:
                event = self._events.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no token within {timeout_s} s") from None
            yield from self._take([event])

    def result(self, timeout_s: float | None = None) -> Any:
        """What the request's steps returned, once it finished (blocking); its error if it failed."""
        for _ in self.tokens(timeout_s):
            pass
        return self._value

    def poll(self) -> tuple[list[int], bool]:
        """The tokens produced since the last poll, and whether the request has ended (non-blocking;
        raises the request's error once it has ended with one)."""
        events = []
        while not self._ended:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
            if isinstance(events[-1], _End):
                break
        return list(self._take(events)), self._ended

    def _take(self, events: Iterable) -> Iterator[int]:
        for event in events:
            if not isinstance(event, _End):
                yield event
                continue
            self._ended = True
            self._value = event.value
            if event.error is not None:
                raise event.error

    def _put(self, event: int | _End) -> None:
        self._events.put(event)
        if self.notify is not None:
            self.notify()


class StepLoop:
    """Runs the requests of sessions of `model` together, a forward step at a time.

    step_tokens     tokens one step computes at most (the shortest chunks first: decodes, then prefills)
    max_sequences   requests one step computes at most (vLLM's max_num_seqs); 1 runs the sessions
                    one at a time, as a worker without batching does
    """

    @checked
    def __init__(self, model: Model, step_tokens: Positive = DEFAULT_STEP_TOKENS,
                 max_sequences: Positive = DEFAULT_MAX_SEQUENCES) -> None:
        self.model = model
        self.step_tokens = step_tokens
        self.max_sequences = max_sequences
        self.steps = 0  # forward steps run
        self.shared_steps = 0  # steps that computed the tokens of more than one request
        self.last_sequences = 0  # requests the last step computed
        self.batched_tokens = 0  # tokens those steps computed
        self._requests: list[Request] = []  # in arrival order
        self._changed = threading.Condition()

    # -- requests (any thread) ---------------------------------------------------------------

    def extend(self, session: Session, token_ids: Iterable[int] | Tensor) -> Request:
        """Feed `token_ids` to `session` (Session.extend's work, chunked; the input is checked now).
        The request's result is the number of tokens the session then holds."""
        return self._submit(session, self._counting(session, session.extending(token_ids, keep_rows=False)))

    def stream(
        self, session: Session, max_new_tokens: int, temperature: float = 0.0, stop: Iterable[int] | None = None,
        seed: int | None = None, top_p: float = 1.0,
    ) -> Request:
        """Generate for `session` as Session.stream does (arguments checked now); read `tokens()`."""
        return self._submit(session, session.streaming(max_new_tokens, temperature, stop, seed, top_p))

    def cancel(self, request: Request) -> None:
        """End `request` before the next step: its chunk in flight is undone, its session keeps
        every token it was given (a cancelled stream's last token is in the log)."""
        with self._changed:
            request.cancelled = True
            self._changed.notify_all()

    def requests_of(self, session: Session) -> list[Request]:
        with self._changed:
            return [request for request in self._requests if request.session is session]

    @property
    def running(self) -> int:
        """Requests in the loop."""
        with self._changed:
            return len(self._requests)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a request is in the loop (True) or `timeout_s` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._requests), timeout_s)

    # -- the loop (one thread) ----------------------------------------------------------------

    def run(self) -> None:
        """Step until no request is left."""
        while self.running:
            self.step()

    def settle(self) -> list[Request]:
        """End the cancelled requests now (their sessions undo their chunks in flight); bring every
        new request to its first chunk. Returns the requests still running."""
        with self._changed:
            requests = list(self._requests)
        for request in requests:
            if request.cancelled:
                self._close(request)
            elif request._chunk is None:
                self._advance(request, request._steps.send, None)
        return [request for request in requests if request._chunk is not None]

    def step(self) -> int:
        """settle(), then run one forward over every running request's next chunk. Returns the
        tokens computed (0: nothing was left to compute)."""
        waiting = self.settle()
        chosen: list[tuple[Request, int]] = []
        budget = self.step_tokens
        for request in sorted(waiting, key=lambda r: len(r._chunk.token_ids)):  # shortest first, then by arrival
            take = min(len(request._chunk.token_ids), budget)
            if take and len(chosen) < self.max_sequences:
                chosen.append((request, take))
                budget -= take
        if not chosen:
            return 0
        self._forward(chosen)
        return self.step_tokens - budget

    def _forward(self, chosen: list[tuple[Request, int]]) -> None:
        begin_s = time.perf_counter()
        try:
            with ExitStack() as pins:
                for store, keys in _keys_by_store(request.session for request, _ in chosen).items():
                    pins.enter_context(store.pinning(keys))  # what the step reads is not pushed out by it
                logits = self.model.forward_batch([request._chunk.step_input(take) for request, take in chosen])
        except BlocksLost as lost:  # the sequence that lost a block recomputes it; the others compute again
            for request, _ in chosen:
                culprit = request.session.kv.namespace == lost.namespace
                self._advance(request, request._steps.throw, lost if culprit else StepUndone())
            return
        except Exception as error:  # every request of the step ends with it (their sessions undo the call)
            for request, _ in chosen:
                self._advance(request, request._steps.throw, error)
            return
        seconds = time.perf_counter() - begin_s
        self.steps += 1
        self.last_sequences = len(chosen)
        self.shared_steps += len(chosen) > 1
        self.batched_tokens += sum(take for _, take in chosen)
        for (request, take), rows in zip(chosen, logits):
            self._advance(request, request._steps.send, Computed(take, rows, seconds))

    def _advance(self, request: Request, resume: Callable, argument: Any) -> None:
        """Resume the request's steps until they ask for a chunk (kept) or end (the request leaves);
        the tokens they yield on the way go to the request's events."""
        request._chunk = None
        try:
            while True:
                item = resume(argument)
                if isinstance(item, Chunk):
                    request._chunk = item
                    return
                request._put(item)
                resume, argument = request._steps.send, None
        except StopIteration as done:
            self._finish(request, _End(value=done.value))
        except Exception as error:
            self._finish(request, _End(error=error))

    def _close(self, request: Request) -> None:
        try:
            request._steps.close()  # the session undoes the chunk in flight
        except Exception as error:
            self._finish(request, _End(error=error))
            return
        self._finish(request, _End())

    def _finish(self, request: Request, end: _End) -> None:
        request._chunk = None
        with self._changed:
            self._requests.remove(request)
            request.finished = True
            self._changed.notify_all()
        request._put(end)

    def _submit(self, session: Session, steps: Steps) -> Request:
        if session.model is not self.model:
            steps.close()
            raise ValueError("the session runs another model than this loop's")
        request = Request(session, steps)
        with self._changed:
            if any(other.session is session for other in self._requests):
                steps.close()
                raise ValueError(f"session {session.session_id!r} has a call in progress")
            self._requests.append(request)
            self._changed.notify_all()
        return request

    @staticmethod
    def _counting(session: Session, steps: Steps) -> Steps:
        yield from steps
        return len(session.tokens)


def _keys_by_store(sessions: Iterable[Session]) -> dict:
    """Every block key of the sessions, grouped by their store (one pin per store and step)."""
    keys: dict = {}
    for session in sessions:
        keys.setdefault(session.store, []).extend(session.kv.keys())
    return keys
