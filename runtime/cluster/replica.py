"""SessionReplica: one replica of the cluster's Ray Serve deployment; a thin shell around SessionWorker.

The replica holds one model and one store (device and host tiers local to it; a disk tier in a
directory of its own below the configured disk_dir, since a disk directory has one writer). A
thread of its own drives the worker's StepLoop: the extends and streams of its sessions that are in
progress together share forward steps (continuous batching); `extend` and `stream` are async, so a
call waiting for its tokens holds no thread. Other calls take the loop's lock between steps.
Every method names its session first, which is what the router routes by.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import ray
from ray import serve

from tiered import StoreConfig
from tiered.content import chain_hashes, chain_root, content_key

from .. import saved as saved_sessions
from ..step_loop import Request
from ..worker import SessionWorker
from .metrics import ReplicaMetrics

LOG = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5  # how often the idle loop thread looks whether the replica is shutting down


class SessionMissing(KeyError):
    """The replica does not host the session (it was placed elsewhere, or its replica died)."""


class SessionReplica:
    """model, store_config, dtype, device, batching   as SessionWorker takes them (batching: its
    step_tokens and max_sequences)."""

    def __init__(self, model: str, store_config: StoreConfig | None, dtype: str = "float32", device: str = "cpu",
                 batching: dict | None = None) -> None:
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        context = ray.get_runtime_context()
        self.actor_name = context.get_actor_name()
        self.node_id = context.get_node_id()
        if store_config is not None and store_config.disk_dir is not None:
            own = Path(store_config.disk_dir) / f"replica-{self.replica_id.rsplit('#', 1)[-1]}"
            store_config = dataclasses.replace(store_config, disk_dir=own)
        self.worker = SessionWorker(model, store_config, dtype=dtype, device=device, **(batching or {}))
        self.metrics = ReplicaMetrics(self.replica_id)
        self._lock = threading.Lock()  # held by the loop thread for each step, and by calls that touch sessions
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._drive, name="tiered-step-loop", daemon=True)
        self._thread.start()

    async def adopt(self, session_id: str, options: dict, tokens: list[int], block_hashes: list[str] = ()) -> dict:
        """Host `session_id` from its token log (a new session has none): blocks the store holds
        are reused, the rest computed. Replaces a copy this replica already had."""
        start_s = time.perf_counter()
        with self._lock:
            self.worker.close(session_id)
            self.metrics.forget(session_id)
            self._discover(tokens, options.get("cache_salt", ""))
            self.worker.open(session_id, **options)
            try:
                request = self.worker.loop.extend(self.worker.sessions[session_id], tokens) if tokens else None
            except BaseException:
                self.worker.close(session_id)
                raise
        try:
            if request is not None:
                await self._result(request)
        except BaseException:
            with self._lock:
                self.worker.close(session_id)
            raise
        with self._lock:
            self._record(session_id, "adopt", start_s)
        return self._identity()

    async def extend(self, session_id: str, token_ids: list[int], block_hashes: list[str] = ()) -> int:
        start_s = time.perf_counter()
        held = await self._result(self.worker.loop.extend(self._session(session_id), token_ids))
        with self._lock:
            self._record(session_id, "extend", start_s)
        return held

    async def stream(self, session_id: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                     top_p: float = 1.0) -> AsyncIterator[int]:
        start_s = time.perf_counter()
        request = self.worker.loop.stream(self._session(session_id), max_new_tokens, temperature, seed=seed, top_p=top_p)
        async for token in self._tokens(request):
            yield token
        with self._lock:
            if session_id in self.worker.sessions:
                self._record(session_id, "stream", start_s)

    def stats(self, session_id: str) -> dict:
        with self._lock:
            return {**self.worker.stats(self._check(session_id)), **self._identity()}

    def save(self, session_id: str) -> str:
        """Save the session: its manifest in the shared directory when the store has one (any
        replica resumes it), else next to this replica's disk tier. Returns the manifest's path."""
        with self._lock:
            session = self.worker.sessions[self._check(session_id)]
            shared_dir = self.worker.store.config.shared_dir
            if shared_dir is None:
                return str(session.save())
            self.worker.store.flush()  # its sealed blocks are in the shared tier first
            record = saved_sessions.SavedSession(
                session_id=session_id, fingerprint=self.worker.model.fingerprint,
                block_tokens=self.worker.store.config.block_tokens, tokens=list(session.tokens),
                options=dict(session.options), saved_at_s=time.time())
            return str(saved_sessions.write(shared_dir, record))

    def close(self, session_id: str) -> None:
        with self._lock:
            self.worker.close(session_id)
            self.metrics.forget(session_id)
            self.metrics.observe("close", 0.0, len(self.worker.sessions))

    def describe(self, replica: str | None = None) -> dict:
        """The replica's identity, its sessions, its store's statistics, the model's shape, and its
        batching: forward steps run, those shared by several calls, tokens they computed, calls in progress."""
        with self._lock:
            loop = self.worker.loop
            batching = {"steps": loop.steps, "shared_steps": loop.shared_steps, "batched_tokens": loop.batched_tokens,
                        "running": loop.running}
            return {**self._identity(), "sessions": sorted(self.worker.sessions), "store": self.worker.store.stats(),
                    "model": self.worker.model_info(), "batching": batching}

    def tokenizer_json(self, replica: str | None = None) -> str:
        """The model's tokenizer, serialized (runtime.model.tokenizer.Tokenizer.from_json reads it):
        what an HTTP ingress needs to turn text into the token ids it routes by."""
        return self.worker.model.tokenizer.to_json()

    def __del__(self) -> None:
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
            self._thread.join(timeout=10 * IDLE_WAIT_S)
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()

    def _drive(self) -> None:
        """The loop thread: a step whenever a call is in progress."""
        loop = self.worker.loop
        while not self._stopping.is_set():
            if not loop.wait(IDLE_WAIT_S):
                continue
            with self._lock:
                try:
                    if loop.step():
                        self.metrics.observe_step(loop.last_sequences, loop.running)
                except Exception:  # a step's own errors end its requests; this is a bug, not a request's fault
                    LOG.exception("a step of the loop failed")

    async def _tokens(self, request: Request) -> AsyncIterator[int]:
        """The request's tokens as the loop thread produces them; cancels it if the caller goes away."""
        ready = asyncio.Event()
        event_loop = asyncio.get_running_loop()
        request.notify = lambda: event_loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                tokens, ended = request.poll()
                for token in tokens:
                    yield token
                if ended:
                    return
                await ready.wait()
                ready.clear()
        finally:
            if not request.finished:
                self.worker.loop.cancel(request)

    async def _result(self, request: Request):
        async for _ in self._tokens(request):
            pass
        return request.result()

    def _record(self, session_id: str, method: str, start_s: float) -> None:
        stats = self.worker.stats(session_id)
        self.metrics.record(session_id, stats, method, time.perf_counter() - start_s, len(self.worker.sessions))

    def _discover(self, tokens: list[int], salt: str) -> int:
        """Make the store track the blocks of `tokens` that other replicas left in the shared tier."""
        store = self.worker.store
        if store.config.shared_dir is None or not tokens:
            return 0
        block_tokens, layers = store.config.block_tokens, self.worker.model.config.num_layers
        digests = chain_hashes(chain_root(self.worker.model.fingerprint, block_tokens, salt), tokens, block_tokens)
        return store.discover(content_key(d, layer, i) for i, d in enumerate(digests) for layer in range(layers))

    def _check(self, session_id: str) -> str:
        if session_id not in self.worker.sessions:
            raise SessionMissing(f"session {session_id!r} is not on replica {self.replica_id}")
        return session_id

    def _session(self, session_id: str):
        with self._lock:
            return self.worker.sessions[self._check(session_id)]

    def _identity(self) -> dict:
        return {"replica_id": self.replica_id, "actor_name": self.actor_name, "node_id": self.node_id}
