"""TraceRecorder: writes the requests a runtime serves as a trace `tiered simulate` reads.

Each request becomes one line of Mooncake's JSONL format (`timestamp` in ms since the recorder
started, `input_length`, `output_length`, `hash_ids`), plus our own fields: `block_tokens` on
every line, and whatever the caller measured (`ttft_s`, `reused_tokens`, `session`, ...).

`hash_ids` name the request's full blocks, prefix-chained: id i depends on every token of
blocks 0..i, so two requests share leading ids exactly when they share those tokens. Pass the
store's own content digests (`block_digests`, as sessions compute them, salted with the model
fingerprint) to make the ids the keys the store uses; without them the recorder chains xxh64
over the token ids. Only full blocks are named: only full blocks are shared.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash


class TraceRecorder:
    """Appends one JSONL line per recorded request to `path` (created, or truncated).

    block_tokens  tokens per block of the runtime's store
    clock         seconds, monotonic; the first line's timestamp is the time since construction
    """

    def __init__(self, path: str | Path, block_tokens: int, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        self.path = Path(path)
        self.block_tokens = block_tokens
        self.requests = 0
        self._clock = clock
        self._start_s = clock()
        self._last_ms = 0.0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")

    def record(
        self,
        token_ids: Sequence[int],
        output_tokens: int,
        *,
        arrival_s: float | None = None,
        block_digests: Sequence[bytes] | None = None,
        **fields,
    ) -> dict:
        """Write one request: its whole input `token_ids` and the tokens it generated. arrival_s:
        when it arrived, on the recorder's clock (default: now). Extra keyword fields (JSON
        values) are added to the line. Returns the line as a dict."""
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens must be an int >= 0, got {output_tokens!r}")
        clash = sorted(set(fields) & {"timestamp", "input_length", "output_length", "hash_ids", "block_tokens"})
        if clash:
            raise ValueError(f"fields {clash} are written by the recorder itself")
        full_blocks = len(token_ids) // self.block_tokens
        if block_digests is None:
            hash_ids = self.chain_ids(token_ids)
        elif len(block_digests) != full_blocks:
            raise ValueError(
                f"{len(block_digests)} block digests for {full_blocks} full blocks of {len(token_ids)} tokens"
            )
        else:
            hash_ids = [int.from_bytes(bytes(d[:8]), "big") >> 1 for d in block_digests]
        with self._lock:
            now_s = self._clock() if arrival_s is None else arrival_s
            timestamp_ms = max(round((now_s - self._start_s) * 1000.0, 3), self._last_ms)  # never out of order
            self._last_ms = timestamp_ms
            line = {
                "timestamp": timestamp_ms,
                "input_length": len(token_ids),
                "output_length": output_tokens,
                "hash_ids": hash_ids,
                "block_tokens": self.block_tokens,
                **fields,
            }
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
            self.requests += 1
        return line

    def check_block_tokens(self, block_tokens: int) -> None:
        """ValueError unless this recorder counts blocks of `block_tokens` tokens, as the store does."""
        if block_tokens != self.block_tokens:
            raise ValueError(f"the recorder counts blocks of {self.block_tokens} tokens, the store {block_tokens}")

    def now_s(self) -> float:
        """The recorder's clock now (what `record`'s arrival_s is measured on)."""
        return self._clock()

    def chain_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Prefix-chained 63-bit ids of the full blocks of `token_ids`."""
        ids, parent = [], b""
        for start in range(0, len(token_ids) - self.block_tokens + 1, self.block_tokens):
            block = ",".join(map(str, token_ids[start : start + self.block_tokens])).encode()
            parent = xxhash.xxh64_digest(parent + b"|" + block)
            ids.append(int.from_bytes(parent, "big") >> 1)
        return ids

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
