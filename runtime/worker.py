"""SessionWorker: a model, one tiered store, and the sessions it hosts on that store.

A plain class; runtime/cluster/replica.py makes it a Ray Serve replica. Sessions share the store's
capacity (the eviction policy arbitrates) and its cached blocks (a session over a document another
session read reuses those blocks). Their calls run in one StepLoop (continuous batching): calls of
different sessions that are in progress together share forward steps. Here the caller drives the
loop (each `extend`, and each token a `stream` waits for, steps it); the replica drives it from a
thread of its own instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tiered import StoreConfig, TieredStore

from .model import load_model
from .session import Session, model_store_config
from .step_loop import DEFAULT_MAX_SEQUENCES, DEFAULT_STEP_TOKENS, Request, StepLoop


class SessionWorker:
    """Hosts sessions of one model on one store, addressed by session id.

    store_config   the worker's store (default StoreConfig()); its layers and fingerprint come from the model
    step_tokens, max_sequences   the StepLoop's: tokens and sessions one forward step computes at most
    """

    def __init__(
        self, model: str = "smollm2-135m", store_config: StoreConfig | None = None, dtype: str = "float32",
        device: str = "cpu", step_tokens: int = DEFAULT_STEP_TOKENS, max_sequences: int = DEFAULT_MAX_SEQUENCES,
    ) -> None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.model = load_model(model, dtype=torch_dtype, device=device)
        self.store = TieredStore(model_store_config(self.model, store_config))
        self.sessions: dict[str, Session] = {}
        self.loop = StepLoop(self.model, step_tokens, max_sequences)

    def model_info(self) -> dict:
        cfg = self.model.config
        return {"layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "max_tokens": cfg.max_position_embeddings, "fingerprint": self.model.fingerprint}

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.model.tokenizer.decode(token_ids)

    def open(self, session_id: str, **session_options) -> str:
        """Start session `session_id` on the worker's store; options as runtime.Session takes them."""
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open on this worker")
        self.sessions[session_id] = Session(self.model, store=self.store, session_id=session_id, **session_options)
        return session_id

    def resume(self, session_id: str) -> int:
        """Reopen a saved session from the store's disk tier; returns the tokens it holds."""
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open on this worker")
        session = Session.resume(self.model, session_id, store=self.store)
        self.sessions[session_id] = session
        return len(session.tokens)

    def extend(self, session_id: str, token_ids: list[int]) -> int:
        """Feed tokens; returns how many tokens the session now holds."""
        request = self.loop.extend(self._session(session_id), token_ids)
        for _ in self._drive(request):
            pass
        return request.result()

    def stream(self, session_id: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
               top_p: float = 1.0) -> Iterator[int]:
        """Generate for the session (arguments checked now); tokens as the loop produces them.
        Closing the iterator early cancels the rest."""
        return self._drive(self.loop.stream(self._session(session_id), max_new_tokens, temperature, seed=seed, top_p=top_p))

    def _drive(self, request: Request) -> Iterator[int]:
        """Step the loop (every request in it advances) until `request` ends; yields its tokens."""
        try:
            while True:
                tokens, ended = request.poll()
                yield from tokens
                if ended:
                    return
                self.loop.step()
        finally:
            if not request.finished:
                self.loop.cancel(request)
                self.loop.settle()

    def stats(self, session_id: str) -> dict:
        return self._session(session_id).stats()

    def save(self, session_id: str) -> str:
        """Save the session durably; returns the manifest's path."""
        return str(self._session(session_id).save())

    def saved(self) -> list[dict]:
        """Summaries of the sessions saved in this worker's disk tier."""
        return Session.saved(self.store)

    def close(self, session_id: str) -> None:
        """Cancel the session's call in progress, if any, and close it."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            for request in self.loop.requests_of(session):
                self.loop.cancel(request)
            self.loop.settle()
            session.close()

    def shutdown(self) -> None:
        """Close every session and the store (sealed blocks reach the disk first)."""
        for session_id in list(self.sessions):
            self.close(session_id)
        self.store.close()

    def _session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no session {session_id!r} on this worker; open it first") from None
