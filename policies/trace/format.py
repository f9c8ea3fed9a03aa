"""The trace format: what attention saw at each decode step and layer, for replaying policies.

A Trace lives in memory as tensors; `to_arrays` / `from_arrays` convert it to and from plain
numpy arrays plus a JSON header (a uint8 array), which runtime/traces.py writes with
`np.savez` and reads with `allow_pickle=False`. Nothing here touches files: policies do no I/O.

Arrays (steps: recorded queries; the first `observe_steps` are the tail of the prompt):
    query       [steps, layers, heads, head_dim]     float16/32, RoPE applied
    keys        [layers, kv_heads, tokens, head_dim] float16/32, RoPE applied, every position
    tokens      [steps] int64                        tokens the step's query attends over, its own
                                                     included; its position is tokens - 1
    block_mass  [steps, layers, heads, blocks]       float32, the true attention mass per block, 0 past
                                                     the step's blocks; blocks = ceil(keys' tokens / block_tokens)
Header: format, version, block_tokens, scale (the softmax scale), observe_steps, info (free JSON).
The blocks' key summaries are not stored: they are `key_bounds` of the keys a step sees, the
same function the KV manager uses, so replay scores exactly what the runtime would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..importance.tensors import block_mass, blocks_of, key_bounds

FORMAT = "tiered-trace"
VERSION = 1
ARRAYS = ("query", "keys", "tokens", "block_mass")
MASS_SUM_TOLERANCE = 1e-2  # per head, the recorded mass must sum to 1 within this (fp16 captures)


def attention_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · q·k of every head and key.

    query [heads, head_dim], keys [kv_heads, tokens, head_dim] -> [heads, tokens] float32.
    """
    kv_heads, tokens, head_dim = keys.shape
    q = query.float().view(kv_heads, -1, head_dim)  # [kv_heads, group, head_dim]
    logits = q @ keys.float().transpose(1, 2)  # [kv_heads, group, tokens]
    return logits.reshape(-1, tokens) * scale


@dataclass(frozen=True)
class Trace:
    """A recorded (or synthetic) decode run; see the module docstring for the arrays."""

    query: torch.Tensor
    keys: torch.Tensor
    tokens: torch.Tensor
    block_mass: torch.Tensor
    block_tokens: int
    scale: float
    observe_steps: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)
        try:  # info is stored as JSON: keep it as JSON gives it back (tuples become lists)
            object.__setattr__(self, "info", json.loads(json.dumps(self.info)))
        except (TypeError, ValueError) as err:
            raise TypeError(f"Trace.info must be JSON-serializable: {err}") from None

    @property
    def steps(self) -> int:
        return self.query.shape[0]

    @property
    def layers(self) -> int:
        return self.query.shape[1]

    @property
    def heads(self) -> int:
        return self.query.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    def blocks_at(self, step: int) -> int:
        """Blocks the query of `step` attends over (the last one may be partial)."""
        return blocks_of(int(self.tokens[step]), self.block_tokens)

    def block_nbytes(self, element_bytes: int = 2) -> int:
        """Bytes of keys plus values of one full block at `element_bytes` per element (fp16: 2)."""
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * element_bytes

    def key_bounds(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_min, key_max) of the blocks `step` sees at `layer`: each [blocks, kv_heads, head_dim] float32."""
        return key_bounds(self.keys[layer, :, : int(self.tokens[step])].float(), self.block_tokens)

    def logits(self, step: int, layer: int) -> torch.Tensor:
        """scale · q·k of the step's query over the keys it sees: [heads, tokens] float32."""
        return attention_logits(self.query[step, layer], self.keys[layer, :, : int(self.tokens[step])], self.scale)

    def mass(self, step: int, layer: int) -> torch.Tensor:
        """The recorded attention mass of the step's blocks: [heads, blocks] float32."""
        return self.block_mass[step, layer, :, : self.blocks_at(step)].float()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays and the JSON header as uint8 (np.savez writes them without pickle)."""
        header = {
            "format": FORMAT,
            "version": VERSION,
            "block_tokens": self.block_tokens,
            "scale": self.scale,
            "observe_steps": self.observe_steps,
            "info": self.info,
        }
        arrays = {name: getattr(self, name).cpu().numpy() for name in ARRAYS}
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Trace:
        """The Trace `to_arrays` produced; ValueError naming what is missing or malformed."""
        missing = [name for name in (*ARRAYS, "header") if name not in arrays]
        if missing:
            raise ValueError(f"a trace needs arrays {[*ARRAYS, 'header']}; missing {missing}")
        header = arrays["header"]
        if not isinstance(header, np.ndarray) or header.dtype != np.uint8 or header.ndim != 1:
            raise ValueError("the trace header must be a 1-D uint8 array of UTF-8 JSON")
        try:
            meta = json.loads(header.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"the trace header is not UTF-8 JSON: {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(
                f"not a {FORMAT} file (header format {meta.get('format') if isinstance(meta, dict) else meta!r})"
            )
        if meta.get("version") != VERSION:
            raise ValueError(
                f"trace format version {meta.get('version')!r} is not supported; this reader reads version {VERSION}"
            )
        tensors = {}
        for name in ARRAYS:
            array = arrays[name]
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
                raise ValueError(
                    f"trace array {name!r} must be a numeric array, got {getattr(array, 'dtype', type(array).__name__)}"
                )
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
        tensors["tokens"] = tensors["tokens"].long()
        tensors["block_mass"] = tensors["block_mass"].float()
        return cls(
            **tensors,
            block_tokens=meta.get("block_tokens"),
            scale=meta.get("scale"),
            observe_steps=meta.get("observe_steps", 0),
            info=meta.get("info", {}),
        )


def _check(trace: Trace) -> None:
    """Raise ValueError/TypeError unless every array and field is consistent."""
    for name in ARRAYS:
        if not isinstance(getattr(trace, name), torch.Tensor):
            raise TypeError(f"Trace.{name} must be a torch.Tensor, got {type(getattr(trace, name)).__name__}")
    query, keys, tokens, mass = trace.query, trace.keys, trace.tokens, trace.block_mass
    if isinstance(trace.block_tokens, bool) or not isinstance(trace.block_tokens, int) or trace.block_tokens <= 0:
        raise ValueError(f"Trace.block_tokens must be an int > 0, got {trace.block_tokens!r}")
    if isinstance(trace.scale, bool) or not isinstance(trace.scale, (int, float)) or not trace.scale > 0:
        raise ValueError(f"Trace.scale must be a number > 0, got {trace.scale!r}")
    if not isinstance(trace.info, dict):
        raise TypeError(f"Trace.info must be a dict, got {type(trace.info).__name__}")
    for name, tensor, dims, what in (
        ("query", query, 4, "[steps, layers, heads, head_dim]"),
        ("keys", keys, 4, "[layers, kv_heads, tokens, head_dim]"),
        ("tokens", tokens, 1, "[steps]"),
        ("block_mass", mass, 4, "[steps, layers, heads, blocks]"),
    ):
        if tensor.dim() != dims or 0 in tensor.shape:
            raise ValueError(f"Trace.{name} must be a non-empty tensor of shape {what}, got {tuple(tensor.shape)}")
    for name, tensor in (("query", query), ("keys", keys), ("block_mass", mass)):
        if tensor.dtype not in (torch.float16, torch.float32):
            raise TypeError(f"Trace.{name} must be float16 or float32, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Trace.{name} must be finite")
    if tokens.dtype != torch.int64:
        raise TypeError(f"Trace.tokens must be int64, got {tokens.dtype}")
    steps, layers, heads, head_dim = query.shape
    if keys.shape[0] != layers or keys.shape[3] != head_dim:
        raise ValueError(
            f"Trace.keys must be [layers={layers}, kv_heads, tokens, head_dim={head_dim}], got {tuple(keys.shape)}"
        )
    if heads % keys.shape[1]:
        raise ValueError(f"Trace query heads ({heads}) must be a multiple of kv_heads ({keys.shape[1]})")
    blocks = blocks_of(keys.shape[2], trace.block_tokens)
    if tuple(mass.shape) != (steps, layers, heads, blocks):
        raise ValueError(
            f"Trace.block_mass must be [steps, layers, heads, blocks] = {(steps, layers, heads, blocks)}, "
            f"got {tuple(mass.shape)}"
        )
    if tokens.shape[0] != steps or tokens.min() < 1 or tokens.max() > keys.shape[2]:
        raise ValueError(
            f"Trace.tokens must be [steps={steps}] values in 1..{keys.shape[2]}, got {tuple(tokens.shape)}"
        )
    if (
        isinstance(trace.observe_steps, bool)
        or not isinstance(trace.observe_steps, int)
        or not 0 <= trace.observe_steps < steps
    ):
        raise ValueError(f"Trace.observe_steps must be an int in 0..{steps - 1}, got {trace.observe_steps!r}")
    if (mass < 0).any():
        raise ValueError("Trace.block_mass must not be negative")
    sums = mass.sum(-1)  # [steps, layers, heads]
    if ((sums - 1).abs() > MASS_SUM_TOLERANCE).any():
        raise ValueError(f"Trace.block_mass must sum to 1 per step, layer and head (within {MASS_SUM_TOLERANCE})")
    seen = torch.arange(blocks) < ((tokens + trace.block_tokens - 1) // trace.block_tokens)[:, None]  # [steps, blocks]
    if (mass * ~seen[:, None, None, :]).any():
        raise ValueError("Trace.block_mass must be 0 on blocks past each step's tokens")


def mass_from_vectors(
    query: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, block_tokens: int, scale: float
) -> torch.Tensor:
    """The exact attention mass per block of every step and layer: [steps, layers, heads, blocks].

    query [steps, layers, heads, head_dim], keys [layers, kv_heads, tokens, head_dim], tokens [steps].
    """
    steps, layers, heads, _ = query.shape
    blocks = blocks_of(keys.shape[2], block_tokens)
    mass = torch.zeros(steps, layers, heads, blocks)  # [steps, layers, heads, blocks]
    for step in range(steps):
        seen = int(tokens[step])
        for layer in range(layers):
            weights = torch.softmax(attention_logits(query[step, layer], keys[layer, :, :seen], scale), -1)
            mass[step, layer] = block_mass(weights, block_tokens, blocks)
    return mass
