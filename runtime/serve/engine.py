"""Engine: one OpenAI request as a cluster session: tokens in, text deltas out, usage at the end.

A request's prompt tokens are hashed into block hashes and the session is placed (prefix-affinity)
on the replica that holds the longest prefix of them; the replica opens the session over the
tokens, reusing the cached sealed blocks (`reused_tokens` of its stats is the usage's
cached_tokens), generates, and the session is closed (its blocks stay cached). A request that
names a session (`user`, `X-Session-Id`) keeps one open session per name and tenant, extended
turn after turn while its prompt continues the session's log.

Tenants: a request's cache salt is its API key's digest and its `cache_salt`, so blocks are shared
only by requests with the same key and salt (prompt-cache timing is a known side channel).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from runtime.cluster.handle import ClusterSession

from .backend import ReplicaBackend
from .errors import bad_request

MAX_PINNED_SESSIONS = 256  # named sessions kept open; the least recently used is closed past it


@dataclass(frozen=True)
class Generation:
    """What a request asks for, once its prompt is tokens."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    salt: str = ""  # the tenant's cache salt (tenant_salt)
    pin: str | None = None  # a session name: the conversation keeps one session


@dataclass
class Outcome:
    """How a generation ended: filled in when its text iterator is exhausted."""

    finish_reason: str = "length"
    completion_tokens: int = 0
    cached_tokens: int = 0
    cut: bool = False  # a stop string ended it: the replica's generation was cancelled midway


def tenant_salt(api_key: str | None, cache_salt: str | None) -> str:
    """The salt of a tenant's block hashes: its key (as a digest) and its cache_salt."""
    if not api_key and not cache_salt:
        return ""
    key = hashlib.blake2b(api_key.encode(), digest_size=12).hexdigest() if api_key else ""
    return f"key={key};salt={cache_salt or ''}"


class Engine:
    """backend   the ReplicaBackend; no_reuse: every request gets a salt of its own (the baseline)"""

    def __init__(self, backend: ReplicaBackend, no_reuse: bool = False) -> None:
        self.backend = backend
        self.no_reuse = no_reuse
        self._pins: OrderedDict[str, tuple[ClusterSession | None, threading.Lock]] = OrderedDict()
        self._pins_lock = threading.Lock()

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> int:
        """max_tokens clamped to the context left after the prompt; 400 if the prompt does not fit."""
        context = self.backend.model_info()["max_tokens"]
        if not prompt_ids:
            raise bad_request("the prompt is empty", "prompt")
        if len(prompt_ids) >= context:
            raise bad_request(f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens "
                              "(prompt and completion together)", "messages", "context_length_exceeded")
        return min(max_tokens, context - len(prompt_ids))

    def run(self, gen: Generation, outcome: Outcome) -> Iterator[str]:
        """Text deltas of the completion; `outcome` is complete once the iterator is exhausted."""
        salt = uuid.uuid4().hex if self.no_reuse else gen.salt
        if gen.pin is None:
            session = ClusterSession(self.backend, uuid.uuid4().hex, {"cache_salt": salt})
            try:
                session.extend(gen.prompt_ids)
                outcome.cached_tokens = session.stats()["reused_tokens"]
                yield from self._decode(session, gen, outcome)
            finally:
                session.close()
            return
        name = "pin-" + hashlib.blake2b(f"{salt}\0{gen.pin}".encode(), digest_size=16).hexdigest()
        lock = self._pin_lock(name)
        with lock:
            session = self._pinned_session(name, salt, gen.prompt_ids, outcome)
            try:
                yield from self._decode(session, gen, outcome)
            except BaseException:
                self._drop_pin(name)
                raise
            if outcome.cut:  # the replica may hold tokens past the cut that the handle's log lacks
                self._drop_pin(name)

    def close(self) -> None:
        with self._pins_lock:
            pins, self._pins = list(self._pins.values()), OrderedDict()
        for session, _ in pins:
            if session is not None:
                session.close()

    # -- internals ------------------------------------------------------------------------------

    def _decode(self, session: ClusterSession, gen: Generation, outcome: Outcome) -> Iterator[str]:
        """Stream tokens, detokenize incrementally, and cut at the first stop string."""
        tokenizer = self.backend.tokenizer
        answer: list[int] = []
        sent = 0  # characters of the answer text already yielded
        holdback = max((len(s) for s in gen.stop), default=1) - 1  # a stop string may be half-generated
        for token in session.stream(gen.max_tokens, gen.temperature, gen.seed, gen.top_p):
            answer.append(token)
            text = tokenizer.decode(answer)
            cut = min((i for i in (text.find(s, max(0, sent - holdback)) for s in gen.stop) if i >= 0), default=None)
            if cut is not None:
                outcome.completion_tokens, outcome.finish_reason, outcome.cut = len(answer), "stop", True
                if cut > sent:
                    yield text[sent:cut]
                return
            ready = len(text) - holdback
            if text.endswith("\ufffd"):  # a character's bytes are split across tokens: wait for the rest
                ready = min(ready, len(text) - 1)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        text = tokenizer.decode(answer) if answer else ""
        outcome.completion_tokens = len(answer)
        outcome.finish_reason = "length" if len(answer) >= gen.max_tokens else "stop"
        if len(text) > sent:
            yield text[sent:]

    def _pinned_session(self, name: str, salt: str, prompt_ids: list[int], outcome: Outcome) -> ClusterSession:
        """The named session, extended to `prompt_ids` (reopened over them when they do not continue its log)."""
        session = self._pins[name][0]
        held = len(session.tokens) if session is not None else 0
        if session is not None and held < len(prompt_ids) and prompt_ids[:held] == session.tokens:
            before = session.stats()["reused_tokens"]
            session.extend(prompt_ids[held:])
            outcome.cached_tokens = held + session.stats()["reused_tokens"] - before
            return session
        if session is not None:
            session.close()
        session = ClusterSession(self.backend, name, {"cache_salt": salt})
        self._pins[name] = (session, self._pins[name][1])
        session.extend(prompt_ids)
        outcome.cached_tokens = session.stats()["reused_tokens"]
        return session

    def _pin_lock(self, name: str) -> threading.Lock:
        with self._pins_lock:
            if name not in self._pins:
                self._pins[name] = (None, threading.Lock())
            self._pins.move_to_end(name)
            evicted = []
            while len(self._pins) > MAX_PINNED_SESSIONS:
                evicted.append(self._pins.popitem(last=False)[1][0])
            lock = self._pins[name][1]
        for session in evicted:
            if session is not None:
                session.close()
        return lock

    def _drop_pin(self, name: str) -> None:
        with self._pins_lock:
            session = self._pins.pop(name, (None, None))[0]
        if session is not None:
            session.close()
