"""The fused CPU path: cpu_kernels.c, compiled once per machine and loaded with ctypes.

One call encodes or decodes a whole batch of blocks (no fp32 temporaries the size of a block, no
Python per group), splitting large batches over torch's thread count
(ctypes releases the GIL). The library is built with the system C compiler ($CC, else cc; plus
$TIERED_CFLAGS, e.g. -DTIERED_PORTABLE for the path without x86 intrinsics) into
$TIERED_CACHE_DIR (default ~/.cache/tiered), named by a hash of the source, the flags and the
CPU, and reused by every later process. Without a compiler, `available()` is False and the codecs
use the reference kernels; `build_error()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from policies.importance.select import protected_blocks

from ..atomic import atomic_path
from ..block import KVBlock
from . import reference
from .attend_reference import merge_partials
from .base import check_buffer
from .layout import QuantFormat

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC"]
DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
KINDS = {"int": 0, "fp8": 1}
PARALLEL_MIN_BYTES = 256 << 10  # batches smaller than this run on the calling thread

_errors: list[str] = []
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if "TIERED_CACHE_DIR" in os.environ:
        return Path(os.environ["TIERED_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiered"


def _cpu_identity() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    identity = {"machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags"):
                    identity.setdefault(name, line)
    except OSError:
        pass
    return repr(sorted(identity.items()))


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    flags = FLAGS + shlex.split(os.environ.get("TIERED_CFLAGS", ""))
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # atomic: concurrent builders each install a whole library
            with atomic_path(target, mode=0o755) as tmp:
                subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True,
                               text=True)
        except subprocess.CalledProcessError as err:
            raise OSError(f"{compiler} failed: {err.stderr.strip()[-2000:]}") from err
    lib = ctypes.CDLL(str(target))
    i64, i32, address = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    # begin, end, table, n, shape (see _call)
    for function in (lib.tiered_encode, lib.tiered_decode):
        function.argtypes = [i64, i64, address, i64, ctypes.POINTER(i64)]
        function.restype = i64
    # h_begin, h_end, q, qpos, n, R, H, D, blocks, payloads, tokens, starts, offsets, bits, group, out, lse
    lib.tiered_attend.argtypes = [i64, i64, address, address, i64, i64, i64, i64, i64, address, address, address,
                                  address, i32, i64, address, address, address, i64, i64]
    lib.tiered_attend.restype = i64
    # h_begin, h_end, q, R, D, key rows, value rows, rows, spans, first rows, row counts, out, lse
    lib.tiered_attend_rows.argtypes = [i64, i64, address, i64, i64, address, address, i64, i64, address, address,
                                       address, address]
    lib.tiered_attend_rows.restype = i64
    # q, G, D, key_min, key_max, H, P, protected pages, how many, kept, scores, keep, scratch
    lib.tiered_quest_select.argtypes = [address, i64, i64, address, address, i64, i64, address, i64, i64, address,
                                        address, address]
    lib.tiered_quest_select.restype = i64
    # pages, H, kept, held, per_block, partial, blocks, mark
    lib.tiered_page_blocks.argtypes = [address, i64, i64, i64, i64, i64, address, address]
    lib.tiered_page_blocks.restype = i64
    # pages, H, kept, slots, per_block, page_tokens, block_tokens, head_rows, short_by, first, count
    lib.tiered_page_rows.argtypes = [address, i64, i64, address, i64, i64, i64, i64, i64, address, address]
    lib.tiered_page_rows.restype = None
    return lib


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        return _build()
    except (OSError, subprocess.SubprocessError) as err:
        _errors.append(f"{type(err).__name__}: {err}")
        return None


def available() -> bool:
    """True if the compiled kernels load on this machine (building them on first use)."""
    return _library() is not None


def build_error() -> str | None:
    """Why the kernels are not available, or None."""
    _library()
    return _errors[-1] if _errors else None


class _Shape(NamedTuple):
    """What the library needs of blocks of one shape and dtype in one format."""

    nbytes: int  # payload bytes
    block_bytes: int  # key and value bytes of a block
    args: ctypes.Array  # H, T, D, dtype, kind, bits, group and the 6 payload offsets


@lru_cache(maxsize=256)
def _shape_args(fmt: QuantFormat, shape: torch.Size, dtype: torch.dtype) -> _Shape:
    if dtype not in DTYPES:
        raise TypeError(f"the CPU kernels take fp16, bf16 or fp32 blocks, got {dtype}")
    layout = fmt.layout(*shape)
    args = (ctypes.c_int64 * 13)(*shape, DTYPES[dtype], KINDS[fmt.kind], fmt.bits, fmt.group, *layout.offsets())
    return _Shape(layout.nbytes, 2 * shape.numel() * dtype.itemsize, args)


def _check(keys: list, values: list, payloads: list, shape: torch.Size, dtype: torch.dtype, nbytes: int) -> None:
    """The kernels write through raw addresses: every tensor must be what they assume."""
    if not len(keys) == len(values) == len(payloads):
        raise ValueError(f"got {len(keys)} keys, {len(values)} values and {len(payloads)} payloads")
    for t in keys + values:
        if not t.is_cpu or t.dtype != dtype or t.shape != shape or t.stride(-1) != 1:
            raise ValueError(
                f"the CPU kernels take CPU tensors of shape {tuple(shape)} and dtype {dtype} with contiguous "
                f"channels; got {t.device} {t.dtype} {tuple(t.shape)} strides {t.stride()}"
            )
    for p in payloads:
        if not p.is_cpu or p.dtype != torch.uint8 or p.numel() != nbytes or not p.is_contiguous():
            raise ValueError(f"each payload must be a contiguous CPU uint8 tensor of {nbytes} bytes")


def _run(function: str, fmt: QuantFormat, keys: list, values: list, payloads: list) -> int:
    """function(begin, end, ...) of the library over the batch, split over threads when it is large."""
    shape, dtype, n = keys[0].shape, keys[0].dtype, len(keys)
    known = _shape_args(fmt, shape, dtype)
    _check(keys, values, payloads, shape, dtype, known.nbytes)
    # one int64 table: key, value and payload addresses [3][n], then strides [n][4] (key head,
    # key token, value head, value token)
    table = array("q", [t.data_ptr() for t in keys])
    table.extend([t.data_ptr() for t in values]), table.extend([p.data_ptr() for p in payloads])
    table.extend([s for k, v in zip(keys, values) for s in (*k.stride()[:2], *v.stride()[:2])])
    return _call(function, known, n, table)


def _thread_pool() -> ThreadPoolExecutor:
    """The threads large batches are split over (torch's thread count), made on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="tiered-codec")
        return _pool


def _call(function: str, shape: _Shape, n: int, table: array) -> int:
    """function(begin, end, table, n, shape) of the library over n blocks of `shape` described by
    `table` (int64 key, value and payload addresses [3][n], then [n][4] strides: key head, key
    token, value head, value token), split over threads when the batch is large."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available: {build_error()}")
    call, args = getattr(lib, function), (table.buffer_info()[0], n, shape.args)
    workers = min(n, torch.get_num_threads())
    if workers <= 1 or n * shape.block_bytes < PARALLEL_MIN_BYTES:
        return call(0, n, *args)
    bounds = [n * w // workers for w in range(workers + 1)]
    pool = _thread_pool()
    results = [f.result() for f in [pool.submit(call, bounds[w], bounds[w + 1], *args) for w in range(workers)]]
    if any(r < 0 for r in results):
        return -1
    return min((r for r in results if r > 0), default=0)


def encode(fmt: QuantFormat, keys: list[torch.Tensor], values: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """Write the payload of each block (keys[i], values[i]: [H, T, D], one shape and dtype;
    channels contiguous, any head and token strides) into outs[i] ([nbytes] uint8).
    ValueError if a block cannot be quantized (see reference.py)."""
    _encoded(_run("tiered_encode", fmt, keys, values, outs))


def _encoded(result: int) -> None:
    if result < 0:
        raise MemoryError("the CPU kernels could not allocate scratch memory")
    if result > 0:
        raise ValueError(f"block {result - 1} of this batch: {reference.UNENCODABLE}")


def encode_alike(fmt: QuantFormat, blocks: Sequence[KVBlock], outs: Sequence[torch.Tensor]) -> bool:
    """encode() of KVBlocks alike, in one call: True if every block is on the CPU with blocks[0]'s
    shape and dtype and contiguous channels, and every buffer on the CPU. False, with nothing
    written, if some are not (the caller sorts them). ValueError as check_buffer() says, or if a
    block cannot be quantized. Each tensor is looked at once: this is the spill path's whole cost
    in Python."""
    first = blocks[0].keys
    shape, dtype, n = first.shape, first.dtype, len(blocks)
    known = _shape_args(fmt, shape, dtype)
    keys, values, payloads, strides = [], [], [], []
    for block, out in zip(blocks, outs, strict=True):
        k, v = block.keys, block.values  # one shape, dtype and device (KVBlock)
        k_strides, v_strides = k.stride(), v.stride()
        if k_strides[2] != 1 or v_strides[2] != 1 or not k.is_cpu or not out.is_cpu or k.dtype != dtype or k.shape != shape:
            return False
        check_buffer(out, known.nbytes)
        keys.append(k.data_ptr()), values.append(v.data_ptr()), payloads.append(out.data_ptr())
        strides += (k_strides[0], k_strides[1], v_strides[0], v_strides[1])
    table = array("q", keys)
    table.extend(values), table.extend(payloads), table.extend(strides)
    _encoded(_call("tiered_encode", known, n, table))
    return True


def decode(fmt: QuantFormat, payloads: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Decode each payload into keys[i], values[i] (as encode takes them). ValueError if a
    payload's mins or scales are not finite (the outputs are then partly written)."""
    _decoded(_run("tiered_decode", fmt, keys, values, payloads))


def decode_rows(fmt: QuantFormat, payloads: list[torch.Tensor], keys_out: torch.Tensor, values_out: torch.Tensor,
                rows: list[int], shape: tuple[int, int, int]) -> None:
    """Decode payload i, a block of `shape` ([H, T, D]), into block slot rows[i] of keys_out and
    values_out ([H, blocks, slot tokens >= T, D], channels contiguous): the slots' addresses come
    from the outputs' strides, so no view is made per block. ValueError as decode()."""
    shape = torch.Size(shape)
    dtype, n = keys_out.dtype, len(rows)
    known = _shape_args(fmt, shape, dtype)
    nbytes = known.nbytes
    heads, blocks, tokens, dim = keys_out.shape
    for out in (keys_out, values_out):
        if not out.is_cpu or out.dtype != dtype or out.shape != keys_out.shape or out.stride(-1) != 1:
            raise ValueError(f"decode_rows takes two CPU {dtype} tensors of shape {tuple(keys_out.shape)} with "
                             f"contiguous channels; got {out.device} {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if (heads, dim) != (shape[0], shape[2]) or shape[1] > tokens or any(not 0 <= r < blocks for r in rows):
        raise ValueError(f"blocks of shape {tuple(shape)} do not fit slots {rows} of {tuple(keys_out.shape)}")
    for p in payloads:
        if not p.is_cpu or p.dtype != torch.uint8 or p.numel() != nbytes or not p.is_contiguous():
            raise ValueError(f"each payload must be a contiguous CPU uint8 tensor of {nbytes} bytes")
    (k_head, k_slot, k_token, _), (v_head, v_slot, v_token, _) = keys_out.stride(), values_out.stride()
    k_base, v_base, size = keys_out.data_ptr(), values_out.data_ptr(), keys_out.element_size()
    table = array("q", [k_base + r * k_slot * size for r in rows])
    table.extend([v_base + r * v_slot * size for r in rows]), table.extend([p.data_ptr() for p in payloads])
    table.extend([k_head, k_token, v_head, v_token] * n)
    _decoded(_call("tiered_decode", known, n, table))


def _decoded(result: int) -> None:
    if result < 0:
        raise MemoryError("the CPU kernels could not allocate scratch memory")
    if result > 0:
        raise ValueError(f"payload {result - 1} of this batch: {reference.CORRUPT}")


ATTEND_PARALLEL_MIN_CODES = 1 << 16  # fewer codes than this per call: one thread


def attend(
    fmt: QuantFormat,
    q: torch.Tensor,
    payloads: list[torch.Tensor],
    tokens: list[int],
    starts: list[int],
    kv_heads: int,
    q_positions: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_reference.attend_quantized (same arguments, scale given) in one fused call for the
    "int" kinds: (out [heads, n, head_dim] fp32, lse [heads, n] fp32). Blocks are split over
    torch's thread count when there is enough to read."""
    return BlockTable(fmt, payloads, tokens, starts, kv_heads, q.shape[-1]).attend(q, q_positions, scale)


class BlockTable:
    """Blocks as tiered_attend reads them: payload addresses, tokens, first positions and section
    offsets, checked and laid out once for any number of attend calls over the same blocks (a
    layer's blocks below the device, read at every decode step while they stay where they are).
    Holds the payloads, so their addresses stay valid."""

    def __init__(self, fmt: QuantFormat, payloads: list[torch.Tensor], tokens: list[int], starts: list[int],
                 kv_heads: int, dim: int) -> None:
        if _library() is None:
            raise RuntimeError(f"the CPU kernels are not available: {build_error()}")
        if fmt.kind != "int":
            raise ValueError(f"the fused CPU attention reads int codes, not {fmt.kind}")
        nb = len(payloads)
        layouts = {count: fmt.layout(kv_heads, count, dim) for count in set(tokens)}  # most blocks are full
        addresses = []
        for i, (payload, count) in enumerate(zip(payloads, tokens)):
            nbytes = layouts[count].nbytes
            if not payload.is_cpu or payload.dtype != torch.uint8 or payload.numel() != nbytes or not payload.is_contiguous():
                raise ValueError(f"payload {i} must be a contiguous CPU uint8 tensor of {nbytes} bytes")
            addresses.append(payload.data_ptr())
        # the block table: payload addresses [nb], tokens [nb], first positions [nb], section offsets [nb, 6]
        table = (ctypes.c_int64 * (9 * nb))()
        table[:nb], table[nb : 2 * nb], table[2 * nb : 3 * nb] = addresses, tokens, starts
        if len(layouts) == 1:
            table[3 * nb :] = layouts[tokens[0]].offsets() * nb
        else:
            table[3 * nb :] = [o for count in tokens for o in layouts[count].offsets()]
        self.fmt, self.kv_heads, self.dim, self.tokens, self.starts = fmt, kv_heads, dim, list(tokens), list(starts)
        self._codes = sum(tokens) * kv_heads * dim
        self._payloads, self._table = payloads, table

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor | None, scale: float,
               visible: torch.Tensor | None = None, page_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q ([heads, n, head_dim] on the CPU) over the blocks: (out [heads, n,
        head_dim] fp32, lse [heads, n] fp32), as attend() returns them. `visible`: [kv_heads, pages]
        bool, pages of `page_tokens` positions: KV head h then reads only the pages marked in
        visible[h] (a sparse step's)."""
        lib, fmt, kv_heads, dim, tokens = _library(), self.fmt, self.kv_heads, self.dim, self.tokens
        heads, n, _ = q.shape
        rows, nb, base = heads // kv_heads * n, len(tokens), ctypes.addressof(self._table)
        # grouped: [kv_heads, rows, head_dim] fp32, scaled; row r of KV head h is query head h·group + r // n
        grouped = (q.float().reshape(kv_heads, rows, dim) * scale).contiguous()
        positions = None if q_positions is None else q_positions.to(torch.int64).contiguous()
        position_ptr = 0 if positions is None else positions.data_ptr()
        mask = None if visible is None else self._checked_mask(visible, page_tokens)  # [kv_heads, pages] uint8
        mask_args = (0, 0, 0) if mask is None else (mask.data_ptr(), mask.shape[1], page_tokens)

        def call(first: int, last: int, out: torch.Tensor, lse: torch.Tensor) -> int:
            """Blocks [first, last) into out [H, R, D] and lse [H, R]."""
            return lib.tiered_attend(
                0, kv_heads, grouped.data_ptr(), position_ptr, n, rows, kv_heads, dim, last - first,
                base + 8 * first, base + 8 * (nb + first), base + 8 * (2 * nb + first), base + 8 * (3 * nb + 6 * first),
                fmt.bits, fmt.group, out.data_ptr(), lse.data_ptr(), *mask_args,
            )

        workers = min(nb, torch.get_num_threads())
        if workers <= 1 or self._codes < ATTEND_PARALLEL_MIN_CODES:
            outs = [torch.empty(kv_heads, rows, dim, dtype=torch.float32)]  # [H, R, D]
            lses = [torch.empty(kv_heads, rows, dtype=torch.float32)]  # [H, R]
            results = [call(0, nb, outs[0], lses[0])]
        else:  # blocks split over threads, each a partial result, merged by log-sum-exp
            bounds = [nb * w // workers for w in range(workers + 1)]
            outs = [torch.empty(kv_heads, rows, dim, dtype=torch.float32) for _ in range(workers)]
            lses = [torch.empty(kv_heads, rows, dtype=torch.float32) for _ in range(workers)]
            pool = _thread_pool()
            futures = [pool.submit(call, bounds[w], bounds[w + 1], outs[w], lses[w]) for w in range(workers)]
            results = [f.result() for f in futures]
        if any(r < 0 for r in results):
            raise MemoryError("the CPU kernels could not allocate scratch memory")
        out, lse = merge_partials(list(zip(outs, lses)))
        return out.view(heads, n, dim), lse.view(heads, n)

    def _checked_mask(self, visible: torch.Tensor, page_tokens: int) -> torch.Tensor:
        """`visible` as the kernel reads it ([kv_heads, pages] uint8), checked against the blocks."""
        if isinstance(page_tokens, bool) or not isinstance(page_tokens, int) or page_tokens <= 0:
            raise ValueError(f"page_tokens must be a positive int, got {page_tokens!r}")
        ends = max(start + count for start, count in zip(self.starts, self.tokens))
        if not (isinstance(visible, torch.Tensor) and visible.dtype == torch.bool and visible.is_cpu
                and visible.dim() == 2 and visible.shape[0] == self.kv_heads and visible.shape[1] * page_tokens >= ends):
            raise ValueError(f"visible must be a [{self.kv_heads}, pages] bool CPU tensor covering {ends} positions in "
                             f"pages of {page_tokens}; got {getattr(visible, 'dtype', type(visible).__name__)} "
                             f"{tuple(getattr(visible, 'shape', ()))}")
        return visible.to(torch.uint8).contiguous()


def attend_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: list[int] | torch.Tensor,
                count: list[int] | torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of decode queries over spans of full-precision rows, every key visible, in one
    fused call: (out [heads, n, head_dim] fp32, lse [heads, n] fp32), as attend() returns them.

    q: [heads, n, head_dim] fp32 on the CPU; keys, values: contiguous fp32 tensors of one shape
    whose first axis is the KV heads and last head_dim (a device pool), seen as rows [-1, head_dim];
    first, count: the spans, [kv_heads · spans] ints head after head (or [kv_heads, spans] int64
    tensors): KV head h reads rows first[h · spans + j] .. + count[h · spans + j] of each span j.
    head_dim must be a multiple of 16 (the kernel's vectors)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available: {build_error()}")
    heads, n, dim = q.shape
    kv_heads = keys.shape[0]
    if not (keys.is_cpu and values.is_cpu and keys.dtype == values.dtype == q.dtype == torch.float32
            and keys.shape == values.shape and keys.shape[-1] == dim and keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(f"keys and values must be contiguous fp32 CPU tensors of one shape [kv_heads, ..., {dim}], and q "
                         f"fp32; got {keys.dtype} {tuple(keys.shape)}, {values.dtype} {tuple(values.shape)}, q {q.dtype}")
    if dim % 16 or heads % kv_heads:
        raise ValueError(f"head_dim {dim} must be a multiple of 16 and {heads} query heads a multiple of {kv_heads}")
    rows = heads // kv_heads * n
    if isinstance(first, torch.Tensor):
        spans = first.shape[-1]
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.is_contiguous() and t.is_cpu
                   and t.shape == (kv_heads, spans) for t in (first, count)):
            raise ValueError(f"first and count must be contiguous [{kv_heads}, spans] int64 CPU tensors")
        first_ptr, count_ptr = first.data_ptr(), count.data_ptr()
        reads = rows * dim * spans * int(count[0, 0])  # about: the spans are pages of one size
    else:
        spans = len(first) // kv_heads
        if len(first) != kv_heads * spans or len(count) != len(first):
            raise ValueError(f"first and count must hold {kv_heads} KV heads' spans each, got {len(first)} and {len(count)}")
        table = (ctypes.c_int64 * (2 * len(first)))(*first, *count)
        first_ptr = ctypes.addressof(table)
        count_ptr, reads = first_ptr + 8 * len(first), rows * dim * sum(count)
    grouped = q.reshape(kv_heads, rows, dim) * scale  # [kv_heads, rows, head_dim], a new contiguous tensor
    out = torch.empty(kv_heads, rows, dim, dtype=torch.float32)  # [kv_heads, rows, head_dim]
    lse = torch.empty(kv_heads, rows, dtype=torch.float32)  # [kv_heads, rows]
    args = (grouped.data_ptr(), rows, dim, keys.data_ptr(), values.data_ptr(), keys.numel() // dim, spans,
            first_ptr, count_ptr, out.data_ptr(), lse.data_ptr())
    workers = min(kv_heads, torch.get_num_threads())
    if workers <= 1 or reads < ATTEND_PARALLEL_MIN_CODES * 16:
        result = lib.tiered_attend_rows(0, kv_heads, *args)
    else:  # KV heads split over threads
        bounds = [kv_heads * w // workers for w in range(workers + 1)]
        futures = [_thread_pool().submit(lib.tiered_attend_rows, bounds[w], bounds[w + 1], *args) for w in range(workers)]
        result = min(f.result() for f in futures)
    if result == -2:
        raise ValueError(f"a span reaches past the {keys.numel() // dim} rows of the pool, or before its start")
    if result < 0:
        raise MemoryError("the CPU kernels could not allocate scratch memory")
    return out.view(heads, n, dim), lse.view(heads, n)


def quest_select(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, *, budget_pages: int,
                 sink_pages: int, window_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's scores and each KV head's pages in one call: (scores [kv_heads, pages] fp32, as
    policies.importance.Quest.score gives them; keep [kv_heads, kept] int64, ascending, as
    policies.importance.select_per_head chooses from them, ties to the older page).

    query: [heads, head_dim] fp32; key_min, key_max: [pages, kv_heads, head_dim] fp32 (a layer's
    KeySummaries.bounds), all on the CPU. head_dim must be a multiple of 16."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available: {build_error()}")
    if query.dim() != 2 or key_min.dim() != 3 or key_min.shape != key_max.shape or key_min.shape[2] != query.shape[1]:
        raise ValueError(f"query must be [heads, head_dim] and key_min, key_max [pages, kv_heads, head_dim]; got "
                         f"{tuple(query.shape)}, {tuple(key_min.shape)}, {tuple(key_max.shape)}")
    if not all(t.is_cpu and t.dtype == torch.float32 for t in (query, key_min, key_max)):
        raise ValueError("query, key_min and key_max must be fp32 CPU tensors")
    pages, kv_heads, dim = key_min.shape
    if dim % 16 or query.shape[0] % kv_heads or pages == 0:
        raise ValueError(f"head_dim {dim} must be a multiple of 16, {query.shape[0]} query heads a multiple of "
                         f"{kv_heads}, and there must be pages; got {pages}")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (budget_pages, sink_pages, window_pages)) \
            or budget_pages < 1 or sink_pages < 0 or window_pages < 0:
        raise ValueError(f"budget_pages must be a positive int and sink_pages, window_pages non-negative ints; got "
                         f"{budget_pages!r}, {sink_pages!r}, {window_pages!r}")
    kept = min(budget_pages, pages)
    protect = protected_blocks(pages, sink_pages, window_pages)
    table = (ctypes.c_int64 * max(1, len(protect)))(*protect)
    q, low, high = query.contiguous(), key_min.contiguous(), key_max.contiguous()
    scores = torch.empty(kv_heads, pages, dtype=torch.float32)  # [kv_heads, pages]
    keep = torch.empty(kv_heads, kept, dtype=torch.int64)  # [kv_heads, kept]
    work = torch.empty(2 * pages, dtype=torch.float32)  # [2 · pages] scratch
    result = lib.tiered_quest_select(q.data_ptr(), query.shape[0] // kv_heads, dim, low.data_ptr(),
                                     high.data_ptr(), kv_heads, pages, ctypes.addressof(table), len(protect), kept,
                                     scores.data_ptr(), keep.data_ptr(), work.data_ptr())
    if result == -3:
        raise ValueError("scores must not contain NaN")
    return scores, keep


def page_blocks(pages: torch.Tensor, held: int, per_block: int, partial: bool) -> list[int] | None:
    """The blocks ([n] ascending, each once) that a sparse step's pages ([kv_heads, kept] int64 on
    the CPU) lie in, `per_block` pages to a block, the pages checked as TieredStore.read_pages
    checks them: each in 0..held-1 and, with `partial`, every head's last held - 1. ValueError
    otherwise. None when the kernels are not available (the caller checks in torch)."""
    lib = _library()
    if lib is None:
        return None
    pages = pages.contiguous()
    nblocks = -(-held // per_block)
    blocks = torch.empty(nblocks, dtype=torch.int64)  # [at most nblocks]
    mark = torch.empty(nblocks, dtype=torch.uint8)  # scratch
    n = lib.tiered_page_blocks(pages.data_ptr(), pages.shape[0], pages.shape[1], held, per_block, int(partial),
                               blocks.data_ptr(), mark.data_ptr())
    if n == -2:
        raise ValueError(f"pages must lie in 0..{held - 1}")
    if n == -4:
        raise ValueError("the partial newest page must be the last page of every head")
    return blocks[:n].tolist()


def page_rows(pages: torch.Tensor, slots: torch.Tensor, per_block: int, page_tokens: int, block_tokens: int,
              head_rows: int, short_by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, count), each [kv_heads, kept] int64: where checked pages ([kv_heads, kept] int64)
    lie in a device pool seen as rows, head_rows rows to a KV head: page p of head h starts at
    h · head_rows + slots[p // per_block] · block_tokens + p % per_block · page_tokens and spans
    page_tokens rows, short_by fewer for each head's last (a partial newest page)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available: {build_error()}")
    pages, slots = pages.contiguous(), slots.contiguous()
    first, count = torch.empty_like(pages), torch.empty_like(pages)  # each [kv_heads, kept]
    lib.tiered_page_rows(pages.data_ptr(), pages.shape[0], pages.shape[1], slots.data_ptr(), per_block, page_tokens,
                         block_tokens, head_rows, short_by, first.data_ptr(), count.data_ptr())
    return first, count
