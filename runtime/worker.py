"""SessionWorker: a model, one tiered store, and the sessions it hosts on that store.

A plain class; runtime/actors.py makes it a Ray actor. Sessions share the store's capacity (the
eviction policy arbitrates) and its cached blocks (a session over a document another session
read reuses those blocks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tiered import StoreConfig, TieredStore

from .model import load_model
from .session import Session, model_store_config


class SessionWorker:
    """Hosts sessions of one model on one store, addressed by session id.

    store_config   the worker's store (default StoreConfig()); its layers and fingerprint come from the model
    """

    def __init__(
        self, model: str = "smollm2-135m", store_config: StoreConfig | None = None, dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.model = load_model(model, dtype=torch_dtype, device=device)
        self.store = TieredStore(model_store_config(self.model, store_config))
        self.sessions: dict[str, Session] = {}

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
        session = self._session(session_id)
        session.extend(token_ids)
        return len(session.tokens)

    def stream(self, session_id: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
               top_p: float = 1.0) -> Iterator[int]:
        yield from self._session(session_id).stream(max_new_tokens, temperature, seed=seed, top_p=top_p)

    def stats(self, session_id: str) -> dict:
        return self._session(session_id).stats()

    def save(self, session_id: str) -> str:
        """Save the session durably; returns the manifest's path."""
        return str(self._session(session_id).save())

    def saved(self) -> list[dict]:
        """Summaries of the sessions saved in this worker's disk tier."""
        return Session.saved(self.store)

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
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
