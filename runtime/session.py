"""Session: one multi-turn conversation with a model whose KV cache lives in a TieredStore.

The session's token log is the source of truth for what the cache holds.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from tiered import StoreConfig, TieredStore

from .kv import KVManager
from .model import Model


class Session:
    """A sequence the model extends turn by turn.

    model          a runtime.Model
    store_config   the tiered store to create for this session (its `layers` and `fingerprint`
                   are filled in from the model); or pass `store=` to share an open store
    mode           "exact" (every block takes part) or "sparse" (decode reads a budget of blocks)
    budget_tokens  sparse mode: tokens read per layer and decode step
    importance     sparse mode: importance estimator name (policies.IMPORTANCE)
    prefetch       prefetch policy name (policies.PREFETCH)
    sink_blocks, window_blocks   sparse mode: blocks always read at the start and at the end
    """

    def __init__(
        self,
        model: Model,
        store_config: StoreConfig | None = None,
        mode: str = "exact",
        budget_tokens: int | None = None,
        importance: str = "quest",
        prefetch: str = "none",
        *,
        store: TieredStore | None = None,
        session_id: str | None = None,
        sink_blocks: int = 1,
        window_blocks: int = 2,
    ) -> None:
        cfg = model.config
        if store is None:
            store_config = store_config if store_config is not None else StoreConfig()
            if not isinstance(store_config, StoreConfig):
                raise TypeError(f"store_config must be a StoreConfig, got {type(store_config).__name__}")
            store_config = dataclasses.replace(
                store_config, layers=store_config.layers or cfg.num_layers, fingerprint=store_config.fingerprint or model.fingerprint
            )
            store = TieredStore(store_config)
            self._owns_store = True
        elif store_config is not None:
            raise ValueError("pass store_config or store, not both")
        else:
            self._owns_store = False
        self.model = model
        self.store = store
        self.session_id = session_id or uuid.uuid4().hex
        try:
            self.kv = KVManager(
                store, self.session_id, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                mode=mode, budget_tokens=budget_tokens, importance=importance, prefetch=prefetch,
                sink_blocks=sink_blocks, window_blocks=window_blocks,
            )
        except BaseException:
            self._close_store()
            raise
        self.tokens: list[int] = []  # the token log: every token the cache holds, in order
        self._last_logits: Tensor | None = None  # [vocab] after the last token
        self._timing = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        self._closed = False

    def extend(self, token_ids: Iterable[int] | Tensor) -> Tensor:
        """Feed tokens (teacher forcing); returns logits [n, vocab] float32, row i predicting token i+1.

        Callers chunk long inputs. If anything fails, the session is as it was before the call.
        """
        self._check_open()
        ids = _as_ids(token_ids)
        start = len(self.tokens)
        positions = torch.arange(start, start + ids.numel())
        begin_s = time.perf_counter()
        try:
            logits = self.model.forward(ids, positions, self.kv)
        except BaseException:
            self.kv.truncate(start)
            raise
        kind = "decode" if ids.numel() == 1 else "prefill"
        self._timing[f"{kind}_s"] += time.perf_counter() - begin_s
        self._timing[f"{kind}_tokens"] += ids.numel()
        self.tokens.extend(ids.tolist())
        self._last_logits = logits[-1]
        return logits

    def stream(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Generate up to `max_new_tokens` tokens, yielding each as it is chosen.

        temperature 0 is greedy; above 0, tokens are sampled (reproducibly with `seed`). Generation
        ends before a token in `stop` (default: the tokenizer's end-of-turn and end-of-text tokens),
        which is neither yielded nor added. Every yielded token is in the cache.
        """
        self._check_open()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if self._last_logits is None:
            raise ValueError("generate needs a prompt: call extend() first")
        stops = set(stop_token_ids(self.model.tokenizer) if stop is None else stop)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for _ in range(max_new_tokens):
            token = _choose(self._last_logits, temperature, generator)
            if token in stops:
                return
            yield token
            self.extend([token])

    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """The tokens stream() yields, as a list."""
        return list(self.stream(max_new_tokens, temperature, stop, seed))

    def stats(self) -> dict:
        """Tokens, prefill and decode speed, the KV manager's counters and the store's."""
        timing = dict(self._timing)
        for kind in ("prefill", "decode"):
            seconds = timing[f"{kind}_s"]
            timing[f"{kind}_tokens_per_s"] = timing[f"{kind}_tokens"] / seconds if seconds else 0.0
        return {
            "session_id": self.session_id,
            "tokens": len(self.tokens),
            **timing,
            "kv": dataclasses.asdict(self.kv.counters),
            "store": self.store.stats(),
        }

    def close(self) -> None:
        """Drop this session's blocks (or close the store it made). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_store:
            self._close_store()
        else:
            self.kv.drop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_store(self) -> None:
        if self._owns_store:
            self.store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed")


END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


def stop_token_ids(tokenizer) -> set[int]:
    """The tokenizer's end-of-text token and the end-of-turn tokens of common chat formats it has."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for text in END_OF_TURN:
        token_id = tokenizer.backend.token_to_id(text)
        if token_id is not None:
            stops.add(token_id)
    return stops


def _as_ids(token_ids: Iterable[int] | Tensor) -> Tensor:
    if isinstance(token_ids, Tensor):
        if token_ids.dim() != 1 or token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} {list(token_ids.shape)}")
        ids = token_ids.to(torch.int64)
    else:
        ids_list = list(token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids_list):
            raise TypeError("token_ids must be ints")
        ids = torch.tensor(ids_list, dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("token_ids must not be empty")
    return ids


def _choose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
