"""SessionWorker: a model and the sessions it hosts. A plain class; runtime/actors.py makes it a Ray actor."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tiered import StoreConfig

from .model import load_model
from .session import Session


class SessionWorker:
    """Hosts sessions of one model, addressed by session id."""

    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu") -> None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.model = load_model(model, dtype=torch_dtype, device=device)
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

    def open(self, session_id: str, store_config: StoreConfig, **session_options) -> str:
        """Start session `session_id` on a store of its own; options as runtime.Session takes them."""
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open on this worker")
        self.sessions[session_id] = Session(self.model, store_config, session_id=session_id, **session_options)
        return session_id

    def extend(self, session_id: str, token_ids: list[int]) -> int:
        """Feed tokens; returns how many tokens the session now holds."""
        session = self._session(session_id)
        session.extend(token_ids)
        return len(session.tokens)

    def stream(self, session_id: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Iterator[int]:
        yield from self._session(session_id).stream(max_new_tokens, temperature, seed=seed)

    def stats(self, session_id: str) -> dict:
        return self._session(session_id).stats()

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.close()

    def _session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no session {session_id!r} on this worker; open it first") from None
