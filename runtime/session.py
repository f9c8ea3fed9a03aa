"""Session: one multi-turn conversation with a model whose KV cache lives in a TieredStore.

The session's token log is the source of truth; the KV cache is a cache of it. `extend` first
adopts the longest prefix of whole blocks the store already holds (from this session's past, a
session that shared its beginning, or an earlier process through the disk tier) and computes the
rest; a block lost from every tier is recomputed from the log when it is next read. `save`
records the log next to the disk tier, and `Session.resume` continues it in any process.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from tiered import StoreConfig, TieredStore
from tiered.checked import (
    NonNegative,
    NonNegativeNumber,
    Positive,
    PositiveFraction,
    checked,
)
from tiered.content import chain_hashes, chain_root

from . import open_stores
from . import saved as saved_sessions
from .kv import KVManager
from .kv.manager import BlocksLost
from .model import Model
from .steps import Chunk, Computed, Steps, StepUndone, drive_alone, result_of
from .trace_recorder import TraceRecorder

MAX_LOSSES = 8  # recomputations in one call before the store is declared too small to make progress
OPTIONS = ("mode", "budget_tokens", "importance", "prefetch", "page_tokens", "sink_tokens", "window_tokens",
           "dense_layers", "chunk_tokens", "cache_salt")


class Session:
    """A sequence the model extends turn by turn.

    model          a runtime.Model
    store_config   the tiered store to create for this session (its `layers` and `fingerprint`
                   are filled in from the model); sessions given the same config with a disk_dir
                   share one store in this process. Or pass `store=` to share an open store
    mode           "exact" (every block takes part) or "sparse" (decode reads a budget of tokens)
    budget_tokens  sparse mode: tokens each KV head reads per layer and decode step
    importance     sparse mode: importance estimator name (policies.IMPORTANCE)
    prefetch       prefetch policy name (policies.PREFETCH)
    page_tokens, sink_tokens, window_tokens, dense_layers   sparse mode: see runtime.KVManager
    chunk_tokens   prefill chunk: longer inputs are computed this many tokens at a time
    cache_salt     a tenant's salt: blocks are shared only between sessions with the same salt
    session_id     1..128 letters, digits, '.', '_', '-'; a random one by default
    recorder       a runtime.trace_recorder.TraceRecorder: each turn (an extend, then the
                   generate or stream after it) becomes one request line, stamped when the
                   extend began, with the store's block digests as hash_ids, ttft_s (the
                   extend's seconds), reused_tokens and the session id
    """

    @checked
    def __init__(
        self,
        model: Model,
        store_config: StoreConfig | None = None,
        mode: str = "exact",
        budget_tokens: Positive | None = None,
        importance: str = "quest",
        prefetch: str = "none",
        *,
        store: TieredStore | None = None,
        session_id: str | None = None,
        page_tokens: NonNegative = 16,
        sink_tokens: NonNegative = 16,
        window_tokens: NonNegative = 32,
        dense_layers: NonNegative = 2,
        chunk_tokens: Positive = 512,
        cache_salt: str = "",
        recorder: TraceRecorder | None = None,
    ) -> None:
        cfg = model.config
        session_id = saved_sessions.check_session_id(session_id or uuid.uuid4().hex)
        if store is None:  # sessions given one disk directory in this process share its store
            store = open_stores.acquire(model_store_config(model, store_config))
            self._owns_store = True
        elif store_config is not None:
            raise ValueError("pass store_config or store, not both")
        else:
            self._owns_store = False
            if store.config.fingerprint and store.config.fingerprint != model.fingerprint:
                raise ValueError("the store was made for another model (its fingerprint differs from the model's)")
        self.model = model
        self.store = store
        self.session_id = session_id
        self.options = dict(mode=mode, budget_tokens=budget_tokens, importance=importance, prefetch=prefetch,
                            page_tokens=page_tokens, sink_tokens=sink_tokens, window_tokens=window_tokens,
                            dense_layers=dense_layers, chunk_tokens=chunk_tokens, cache_salt=cache_salt)
        try:
            if recorder is not None:
                recorder.check_block_tokens(store.config.block_tokens)
            self.kv = KVManager(
                store, f"s:{session_id}", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                mode=mode, budget_tokens=budget_tokens, importance=importance, prefetch=prefetch,
                page_tokens=page_tokens, sink_tokens=sink_tokens, window_tokens=window_tokens, dense_layers=dense_layers,
            )
            self._root = chain_root(model.fingerprint, store.config.block_tokens, cache_salt)
        except BaseException:
            self._close_store()
            raise
        self.tokens: list[int] = []  # the token log: every token of the conversation, in order
        self._digests: list[bytes] = []  # content hashes of the log's full blocks
        self._last_logits: Tensor | None = None  # [vocab] after the last token, once computed
        self._timing = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
        self._counts = {"reused_tokens": 0, "computed_tokens": 0, "recomputed_tokens": 0}
        self._closed = False
        self._recorder = recorder
        self._turn: dict | None = None  # the turn being recorded: its request, until its output is known

    # -- the conversation -----------------------------------------------------------------------

    def extend(self, token_ids: Iterable[int] | Tensor) -> Tensor:
        """Feed tokens (teacher forcing); returns logits [m, vocab] float32 for the last m tokens of
        `token_ids`, row i predicting the token after the i-th of them.

        m is the number of new tokens the session computed: tokens whose blocks the store already
        held (a cached prefix) are reused, not computed, and have no row; the last token is always
        computed, so m >= 1. If anything fails, the session is as it was before the call.
        """
        return result_of(drive_alone(self.model, self.extending(token_ids)))

    def extending(self, token_ids: Iterable[int] | Tensor, keep_rows: bool = True) -> Steps:
        """extend's work as steps for a driver (runtime.steps); the input is checked now, before
        any step. keep_rows False: only the last token's logits are computed, and the steps return
        none (an empty [0, vocab] tensor)."""
        self._check_open()
        ids = _as_ids(token_ids)
        self.model.check_token_ids(ids)
        self._check_fits(len(self.tokens) + ids.numel())
        return self._extend_steps(ids.tolist(), keep_rows)

    def _extend_steps(self, ids: list[int], keep_rows: bool) -> Steps:
        if self._recorder is None:
            return (yield from self._append(ids, keep_rows))
        self._end_turn(0)
        arrival_s, reused = self._recorder.now_s(), self._counts["reused_tokens"]
        logits = yield from self._append(ids, keep_rows)
        block = self.store.config.block_tokens
        self._turn = {
            "token_ids": list(self.tokens), "arrival_s": arrival_s,
            "block_digests": self._digests[: len(self.tokens) // block],
            "ttft_s": self._recorder.now_s() - arrival_s, "reused_tokens": self._counts["reused_tokens"] - reused,
        }
        return logits

    def _append(self, ids: list[int], keep_rows: bool = True) -> Steps:
        """Extend the log by `ids` (its callers checked that the log fits)."""
        log = self.tokens + ids
        logits = yield from self._catch_up(log, len(self.tokens), keep_rows)
        self.tokens = log
        return logits

    def _end_turn(self, output_tokens: int) -> None:
        """Write the turn being recorded, with the tokens generated after its extend."""
        turn, self._turn = self._turn, None
        if turn is not None:
            tokens = turn.pop("token_ids")
            self._recorder.record(tokens, output_tokens, session=self.session_id, **turn)

    def stream(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> Iterator[int]:
        """Generate up to `max_new_tokens` tokens, yielding each as it is chosen.

        temperature 0 is greedy; above 0, tokens are sampled (reproducibly with `seed`) from the
        smallest set of most likely tokens whose probabilities add up to `top_p` (nucleus sampling;
        1: from every token). Generation ends before a token in `stop` (default: the tokenizer's
        end-of-turn and end-of-text tokens), which is neither yielded nor added, and when the
        conversation fills the model's context. Every yielded token is in the token log, also when
        the stream is closed right after it (its KV is then computed by the next call).
        The arguments are checked now, before any token.
        """
        return drive_alone(self.model, self.streaming(max_new_tokens, temperature, stop, seed, top_p))

    @checked
    def streaming(
        self,
        max_new_tokens: NonNegative,
        temperature: NonNegativeNumber = 0.0,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
        top_p: PositiveFraction = 1.0,
    ) -> Steps:
        """stream's work as steps for a driver (runtime.steps); the arguments are checked now."""
        self._check_open()
        if not self.tokens:
            raise ValueError("generate needs a prompt: call extend() first")
        stops = set(stop_token_ids(self.model.tokenizer) if stop is None else stop)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self._stream_steps(max_new_tokens, temperature, stops, generator, top_p)

    def _stream_steps(
        self, max_new_tokens: int, temperature: float, stops: set[int], generator: torch.Generator | None, top_p: float
    ) -> Steps:
        generated = 0
        try:
            if self._last_logits is None:  # resumed, or closed right after a token: compute the last token (again)
                self.kv.truncate(min(self.kv.tokens, len(self.tokens) - 1))
                yield from self._catch_up(self.tokens, len(self.tokens) - 1, keep_rows=False)
            for _ in range(max_new_tokens):
                if len(self.tokens) >= self.model.config.max_position_embeddings:
                    return  # the context is full
                self._check_fits(len(self.tokens) + 1)
                token = _choose(self._last_logits, temperature, generator, top_p)
                if token in stops:
                    return
                held = len(self.tokens)
                try:
                    yield token
                    yield from self._append([token], keep_rows=False)
                except BaseException:  # the token was handed out: it stays in the log, its KV comes later
                    if len(self.tokens) == held:
                        self.tokens.append(token)
                        self._last_logits = None
                    raise
                generated += 1
        finally:
            if self._turn is not None:
                self._end_turn(generated)

    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        stop: Iterable[int] | None = None,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> list[int]:
        """The tokens stream() yields, as a list."""
        return list(self.stream(max_new_tokens, temperature, stop, seed, top_p))

    def stats(self) -> dict:
        """Tokens, prefill and decode speed, reuse, the KV manager's counters and the store's.

        reused_tokens: tokens whose blocks were taken from the store instead of computed;
        computed_tokens: new tokens computed; recomputed_tokens: tokens of the log computed again
        because their blocks were lost (evicted from every tier, damaged, or never cached here).
        """
        timing = dict(self._timing)
        for kind in ("prefill", "decode"):
            seconds = timing[f"{kind}_s"]
            timing[f"{kind}_tokens_per_s"] = timing[f"{kind}_tokens"] / seconds if seconds else 0.0
        return {
            "session_id": self.session_id,
            "tokens": len(self.tokens),
            **timing,
            **self._counts,
            "kv": dataclasses.asdict(self.kv.counters),
            "store": self.store.stats(),
        }

    # -- persistence ----------------------------------------------------------------------------

    def save(self) -> Path:
        """Record this session durably next to the disk tier (atomic: a killed save leaves the
        previous one); sealed blocks are flushed to disk first. Returns the manifest's path."""
        self._check_open()
        disk_dir = _disk_dir(self.store)
        self.store.flush()
        record = saved_sessions.SavedSession(
            session_id=self.session_id, fingerprint=self.model.fingerprint, block_tokens=self.store.config.block_tokens,
            tokens=list(self.tokens), options=dict(self.options), saved_at_s=time.time(),
        )
        return saved_sessions.write(disk_dir, record)

    @classmethod
    def resume(
        cls, model: Model, session_id: str, store_config: StoreConfig | None = None, *, store: TieredStore | None = None
    ) -> Session:
        """Reopen the saved session `session_id` from the disk tier of `store` (or of a store made
        from `store_config`). The next extend or generate continues as the saved session would
        have; its KV is taken from the store where it is cached and recomputed where it is not."""
        disk_dir = _disk_dir(store) if store is not None else _disk_dir_of(store_config)
        record = saved_sessions.read(disk_dir, session_id)
        if record.fingerprint != model.fingerprint:
            raise ValueError(f"saved session {session_id!r} was made with another model (fingerprint "
                             f"{record.fingerprint[:12]}..., this model's is {model.fingerprint[:12]}...)")
        session = cls(model, store_config, store=store, session_id=session_id, **record.options)
        if record.block_tokens != session.store.config.block_tokens:
            session.close()
            raise ValueError(f"saved session {session_id!r} used block_tokens={record.block_tokens}; "
                             f"this store has {session.store.config.block_tokens}")
        session.tokens = list(record.tokens)
        return session

    @staticmethod
    def saved(where: TieredStore | StoreConfig | str | Path) -> list[dict]:
        """Summaries of the sessions saved in a store's disk directory (or a directory), oldest first."""
        if isinstance(where, TieredStore):
            where = _disk_dir(where)
        elif isinstance(where, StoreConfig):
            where = _disk_dir_of(where)
        return [record.summary() for record in saved_sessions.listing(where)]

    def delete(self) -> None:
        """Remove this session's save (if any) and close it."""
        if self.store.config.disk_dir is not None:
            saved_sessions.delete(self.store.config.disk_dir, self.session_id)
        self.close()

    def close(self) -> None:
        """Let go of this session's blocks (shared ones stay cached), or close the store it made. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._recorder is not None:
                self._end_turn(0)
            self.kv.release()
        finally:
            self._close_store()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _catch_up(self, log: list[int], rows_from: int, keep_rows: bool = True) -> Generator[Chunk, Computed, Tensor]:
        """Bring the KV cache to all of `log`: adopt cached blocks, compute the rest in chunks,
        recompute lost blocks. Returns the logits of positions rows_from.. ([m, vocab]; with
        keep_rows False only the last token's are computed, and none are returned)."""
        kv, block = self.kv, self.store.config.block_tokens
        before = kv.tokens
        digests = self._digests_of(log)  # content hashes of log's full blocks, once per call
        chunks: list[tuple[int, Tensor]] = []  # (first position, logits) of every computed chunk
        losses = 0
        try:
            while kv.tokens < len(log):
                self._adopt(log, digests)
                start = kv.tokens
                end = min(len(log), start + self.options["chunk_tokens"])
                try:
                    done = yield Chunk(kv, log[start:end], start, last_only=not keep_rows)
                except StepUndone:
                    kv.truncate(start)
                    continue
                except BlocksLost as lost:
                    losses += 1
                    if losses > MAX_LOSSES:
                        raise RuntimeError(
                            f"blocks were lost {losses} times in one call: the store is too small for the "
                            "sessions sharing it (raise its capacity)"
                        ) from lost
                    kv.truncate(min(start, lost.index * block))
                    chunks = [(first, rows[: kv.tokens - first]) for first, rows in chunks if first < kv.tokens]
                    continue
                self._count(done, start)
                chunks.append((start + done.tokens - done.logits.shape[0], done.logits))
                self._seal(digests)
        except BaseException:
            kv.truncate(min(before, kv.tokens))
            raise
        self._last_logits = chunks[-1][1][-1] if chunks and chunks[-1][0] + chunks[-1][1].shape[0] == len(log) else None
        if not keep_rows:
            return torch.empty(0, self.model.config.vocab_size)
        rows = [logits[max(0, rows_from - first):] for first, logits in chunks if first + logits.shape[0] > rows_from]
        return torch.cat(rows) if rows else torch.empty(0, self.model.config.vocab_size)

    def _adopt(self, log: list[int], digests: list[bytes]) -> None:
        """Take cached blocks from the store for log's next whole blocks. The last token is always
        computed (its logits are needed): a block that ends the log is cut back by that token."""
        kv, block = self.kv, self.store.config.block_tokens
        if kv.tokens % block or kv.sealed_blocks * block != kv.tokens:
            return
        first, last = kv.tokens // block, len(log) // block
        if first >= last:
            return
        taken = kv.adopt(digests[first:last])
        self._counts["reused_tokens"] += taken * block
        if kv.tokens == len(log):
            kv.truncate(len(log) - 1)
            self._counts["reused_tokens"] -= block - kv.tokens % block

    def _count(self, done: Computed, start: int) -> None:
        """Account tokens computed at positions start.. (those the log held already are recomputed)."""
        kind = "decode" if done.tokens == 1 else "prefill"
        self._timing[f"{kind}_s"] += done.seconds
        self._timing[f"{kind}_tokens"] += done.tokens
        again = max(0, min(len(self.tokens), start + done.tokens) - start)
        self._counts["recomputed_tokens"] += again
        self._counts["computed_tokens"] += done.tokens - again

    def _seal(self, digests: list[bytes]) -> None:
        full = self.kv.tokens // self.store.config.block_tokens
        if full > self.kv.sealed_blocks:
            self.kv.seal(digests[self.kv.sealed_blocks : full])

    def _digests_of(self, log: list[int]) -> list[bytes]:
        """Content hashes of log's full blocks (the known ones are kept: logs only grow at the end)."""
        block = self.store.config.block_tokens
        known = min(len(self._digests), len(self.tokens) // block)
        if len(log) // block > known:
            parent = self._digests[known - 1] if known else None
            self._digests[known:] = chain_hashes(self._root, log[known * block :], block, parent)
        return self._digests[: len(log) // block]

    def _check_fits(self, tokens: int) -> None:
        cfg = self.model.config
        if tokens > cfg.max_position_embeddings:
            raise ValueError(f"the conversation would hold {tokens} tokens; the model takes at most "
                             f"{cfg.max_position_embeddings}")
        needed = cfg.num_layers * -(-tokens // self.store.config.block_tokens)
        capacity = self.store.capacity_blocks(cfg.num_kv_heads, cfg.head_dim, self.model.dtype)
        if needed > capacity:
            block_bytes = 2 * cfg.num_kv_heads * self.store.config.block_tokens * cfg.head_dim * self.model.dtype.itemsize
            raise ValueError(
                f"{tokens} tokens need {needed} blocks ({needed * block_bytes / 2**20:.1f} MiB of KV); this store's "
                f"tiers hold at most {capacity} blocks: raise device_bytes, host_bytes or disk_bytes"
            )

    def _close_store(self) -> None:
        if self._owns_store:
            open_stores.release(self.store)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed")


def model_store_config(model: Model, store_config: StoreConfig | None) -> StoreConfig:
    """`store_config` (default StoreConfig()) with the model's layer count and fingerprint filled in."""
    config = store_config if store_config is not None else StoreConfig()
    if not isinstance(config, StoreConfig):
        raise TypeError(f"store_config must be a StoreConfig, got {type(config).__name__}")
    if config.fingerprint and config.fingerprint != model.fingerprint:
        raise ValueError("store_config.fingerprint names another model")
    return dataclasses.replace(config, layers=config.layers or model.config.num_layers, fingerprint=model.fingerprint)


def _disk_dir(store: TieredStore) -> Path:
    if store.config.disk_dir is None:
        raise ValueError("saved sessions live next to the disk tier: this store has none (set StoreConfig.disk_dir)")
    return Path(store.config.disk_dir)


def _disk_dir_of(config: StoreConfig | None) -> Path:
    if config is None or config.disk_dir is None:
        raise ValueError("saved sessions live next to the disk tier: pass a store_config with disk_dir")
    return Path(config.disk_dir)


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
    if int(ids.min()) < 0:
        raise ValueError("token_ids must be >= 0")
    return ids


def _choose(logits: Tensor, temperature: float, generator: torch.Generator | None, top_p: float = 1.0) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [vocab]
    if top_p < 1:  # keep the most likely tokens until their mass reaches top_p (at least one)
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # [vocab] bool
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
