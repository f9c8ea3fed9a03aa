"""Request traces in Mooncake's JSONL format, read and checked line by line.

One JSON object per line (Mooncake, FAST'25, kvcache-ai/Mooncake FAST25-release/traces):
`timestamp` (arrival, ms from the trace start, non-decreasing), `input_length` and
`output_length` (tokens), `hash_ids` (one id per block of the input, prefix-chained: requests
that share leading ids share that prefix's KV). Mooncake's blocks hold 512 tokens. Traces our
runtime records (runtime/trace_recorder.py) add `block_tokens` to every line, and may add
fields of their own (`ttft_s`, `reused_tokens`, `session`), which are kept as `extra`.
Files ending in `.gz` are read through gzip.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
REQUIRED = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrives, how long it is, and the hashes of its blocks."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order, and the tokens per block their hash_ids stand for."""

    requests: list[TraceRequest]
    block_tokens: int
    source: str = "trace"

    @property
    def blocks(self) -> int:
        """Blocks over all requests (the denominator of the hit ratio)."""
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0


def read_trace(path: str | Path, block_tokens: int | None = None) -> Trace:
    """The trace in `path`; ValueError naming the file and line of the first bad line.

    block_tokens: tokens per hash id. None takes the trace's own `block_tokens` field, or
    Mooncake's 512 where the lines have none; a value that contradicts the field is an error.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return parse_trace(lines, block_tokens, source=str(path))


def parse_trace(lines: Iterable[str], block_tokens: int | None = None, source: str = "trace") -> Trace:
    """As read_trace, over lines of text."""
    if block_tokens is not None and (not _is_int(block_tokens) or block_tokens < 1):
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    requests: list[TraceRequest] = []
    declared: int | None = None  # the trace's own block_tokens
    last_ms = -math.inf
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in REQUIRED if name not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        timestamp_ms, hash_ids = record["timestamp"], record["hash_ids"]
        if not _is_number(timestamp_ms) or timestamp_ms < 0:
            raise ValueError(f"{where}: timestamp must be a number of ms >= 0, got {timestamp_ms!r}")
        if timestamp_ms < last_ms:
            raise ValueError(f"{where}: timestamp {timestamp_ms} is earlier than the line before ({last_ms})")
        last_ms = timestamp_ms
        for name in ("input_length", "output_length"):
            value = record[name]
            if not _is_int(value) or value < 0:
                raise ValueError(f"{where}: {name} must be a non-negative int, got {value!r}")
        if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
            raise ValueError(f"{where}: hash_ids must be a list of ints")
        if "block_tokens" in record:
            own = record["block_tokens"]
            if not _is_int(own) or own < 1:
                raise ValueError(f"{where}: block_tokens must be a positive int, got {own!r}")
            if declared is not None and own != declared:
                raise ValueError(f"{where}: block_tokens {own} differs from {declared} on earlier lines")
            if block_tokens is not None and own != block_tokens:
                raise ValueError(f"{where}: the trace says block_tokens {own}, but {block_tokens} was asked for")
            declared = own
        tokens_per_block = block_tokens or declared or MOONCAKE_BLOCK_TOKENS
        allowed = -(-record["input_length"] // tokens_per_block)
        if len(hash_ids) > allowed:
            raise ValueError(
                f"{where}: {len(hash_ids)} hash_ids, but an input of {record['input_length']} tokens "
                f"has at most {allowed} blocks of {tokens_per_block} tokens"
            )
        extra = {k: v for k, v in record.items() if k not in REQUIRED and k != "block_tokens"}
        requests.append(
            TraceRequest(timestamp_ms / 1000.0, record["input_length"], record["output_length"], tuple(hash_ids), extra)
        )
    return Trace(requests, block_tokens or declared or MOONCAKE_BLOCK_TOKENS, source)


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` as JSONL (gzip if `path` ends in .gz), with block_tokens on every line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for r in trace.requests:
            record = {
                "timestamp": _milliseconds(r.arrival_s),
                "input_length": r.input_tokens,
                "output_length": r.output_tokens,
                "hash_ids": list(r.hash_ids),
                "block_tokens": trace.block_tokens,
                **r.extra,
            }
            out.write(json.dumps(record) + "\n")
    return path


def _milliseconds(seconds: float) -> int | float:
    ms = round(seconds * 1000.0, 3)
    return int(ms) if ms == int(ms) else ms


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
