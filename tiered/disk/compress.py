"""Payload compression: byte-shuffle 16-bit float payloads, then zstd each byte plane on its own.

Which payloads are shuffled is decided by the codec spec and the block dtype (`shuffle_width`):
the payload of "raw" on a float16/bfloat16 block, and of the "fp16"/"bf16" codecs, is a run of
16-bit floats. Splitting it into a plane of high bytes (sign, exponent, top mantissa bits: few
distinct values) and a plane of low bytes (mantissa: near random) is what makes floats compress;
each plane is its own zstd frame, because one zstd block shares one literal table between
both halves and then gains almost nothing. Every other payload (quantized codes, fp8, fp32) is
one plane.

Stored payload = plane table (width x u32: stored bytes of the plane | PLANE_COMPRESSED) + planes.
A plane is kept compressed only if that saves at least 1/MIN_SAVING_DIVISOR of it; otherwise it
is stored raw (and the record's FLAG_COMPRESSED is set only if some plane is compressed). A plane
that failed to shrink FAILS_BEFORE_SKIP times in a row is stored raw without trying for the next
SKIP_PAYLOADS payloads of its kind, then probed again: incompressible quantized codes then cost
no compression time.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from .record import RecordError

PLANE_COMPRESSED = 1 << 31
MIN_SAVING_DIVISOR = 16  # keep a compressed plane only if it saves >= 1/16 (6.25 %): less does not
# pay for the CPU of compressing and decompressing it (int4 codes, for one, save ~4 %)
FAILS_BEFORE_SKIP = 3
SKIP_PAYLOADS = 63
WINDOW_LOG = 16  # 64 KiB zstd blocks: literal tables adapt within a plane (+2.5 % on 128 KiB fp16 planes)
MT_MIN_PLANE_BYTES = 1 << 20  # zstd worker threads are used only for planes at least this large
SHUFFLED_CODECS = ("fp16", "bf16")  # codecs whose payload is 16-bit floats whatever the block dtype
LITTLE_ENDIAN = sys.byteorder == "little"


def shuffle_width(codec: str, dtype: torch.dtype) -> int:
    """2 for a payload of 16-bit floats (byte-shuffled), 1 for any other payload."""
    name = codec.split(":", 1)[0]
    if name in SHUFFLED_CODECS:
        return 2
    if name == "raw" and dtype in (torch.float16, torch.bfloat16):
        return 2
    return 1


@dataclass(frozen=True, slots=True)
class Packed:
    """A payload ready to write: `buffers` concatenated are the stored payload."""

    buffers: list
    stored_len: int
    compressed: bool


class Packer:
    """Compresses payloads for one disk tier; thread-safe (one zstd context per thread)."""

    def __init__(self, level: int, threads: int = 0) -> None:
        self.level = level
        self.threads = threads
        self._local = threading.local()
        self._lock = threading.Lock()
        self._fails: dict[tuple, int] = {}  # (codec name, width, plane) -> failures in a row
        self._skip: dict[tuple, int] = {}  # (codec name, width, plane) -> payloads left to skip

    def _compressor(self, large: bool) -> zstandard.ZstdCompressor:
        name = "mt" if large else "st"
        cctx = getattr(self._local, name, None)
        if cctx is None:
            threads = self.threads if large else 0
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, window_log=WINDOW_LOG, threads=threads, write_content_size=True
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            setattr(self._local, name, cctx)
        return cctx

    def _should_try(self, kind: tuple) -> bool:
        with self._lock:
            left = self._skip.get(kind, 0)
            if left:
                self._skip[kind] = left - 1
                return False
            return True

    def _learn(self, kind: tuple, shrank: bool) -> None:
        with self._lock:
            if shrank:
                self._fails.pop(kind, None)
                return
            fails = self._fails.get(kind, 0) + 1
            if fails >= FAILS_BEFORE_SKIP:
                self._skip[kind] = SKIP_PAYLOADS
                fails = 0
            self._fails[kind] = fails

    def pack(self, payload: np.ndarray, width: int, codec: str) -> Packed:
        """Shuffle (width 2) and compress `payload` ([nbytes] uint8, contiguous)."""
        planes = split_planes(payload, width)
        name = codec.split(":", 1)[0]
        table, data, compressed = [], [], False
        for i, plane in enumerate(planes):
            kind = (name, width, i)
            stored = plane
            if plane.nbytes and self._should_try(kind):
                frame = self._compressor(plane.nbytes >= MT_MIN_PLANE_BYTES and self.threads > 0).compress(plane)
                shrank = len(frame) <= plane.nbytes - plane.nbytes // MIN_SAVING_DIVISOR
                self._learn(kind, shrank)
                if shrank:
                    stored = frame
            is_frame = stored is not plane
            compressed |= is_frame
            table.append(len(stored) | (PLANE_COMPRESSED if is_frame else 0))
            data.append(stored)
        head = struct.pack(f"<{width}I", *table)
        return Packed([head, *data], len(head) + sum(entry & ~PLANE_COMPRESSED for entry in table), compressed)


def split_planes(payload: np.ndarray, width: int) -> list[np.ndarray]:
    """Plane i holds byte i (in memory order) of every `width`-byte element; each [nbytes / width] uint8."""
    if width == 1:
        return [payload]
    if width == 2 and LITTLE_ENDIAN:  # two vectorized passes beat a strided transpose by ~3x
        elements = payload.view(np.uint16)
        return [elements.astype(np.uint8), (elements >> 8).astype(np.uint8)]
    return list(np.ascontiguousarray(payload.reshape(-1, width).T))


def join_planes(planes: list, width: int, raw_len: int) -> np.ndarray:
    """The inverse of split_planes: a [raw_len] uint8 array (a view of planes[0] when width is 1
    and that plane is writable, else fresh)."""
    if width == 1:
        plane = np.frombuffer(planes[0], dtype=np.uint8)
        return plane if plane.flags.writeable else plane.copy()
    out = np.empty(raw_len, dtype=np.uint8)
    if width == 2 and LITTLE_ENDIAN:
        elements = out.view(np.uint16)
        np.left_shift(np.frombuffer(planes[1], dtype=np.uint8), 8, out=elements, dtype=np.uint16)
        elements |= np.frombuffer(planes[0], dtype=np.uint8)
    else:
        columns = out.reshape(-1, width)  # [elements, width]: column i is plane i
        for i, plane in enumerate(planes):
            columns[:, i] = np.frombuffer(plane, dtype=np.uint8)
    return out


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def unpack(stored: memoryview, width: int, raw_len: int) -> np.ndarray:
    """The payload ([raw_len] uint8, writable; it may view `stored`) from its stored form.

    RecordError if the stored form does not describe exactly raw_len bytes; lengths are checked
    before anything is decompressed, so a bad frame cannot make it allocate more than raw_len.
    """
    table_len = 4 * width
    if len(stored) < table_len or raw_len % width:
        raise RecordError("stored payload too short for its plane table")
    plane_len = raw_len // width
    table = struct.unpack_from(f"<{width}I", stored)
    planes = []
    pos = table_len
    for i, entry in enumerate(table):
        size = entry & ~PLANE_COMPRESSED
        chunk = stored[pos : pos + size]
        pos += size
        if len(chunk) != size:
            raise RecordError("plane extends past the stored payload")
        if entry & PLANE_COMPRESSED:
            try:
                if zstandard.frame_content_size(chunk) != plane_len:
                    raise RecordError("compressed plane declares the wrong size")
                plane = _decompressor().decompress(chunk, max_output_size=plane_len)
            except zstandard.ZstdError as err:
                raise RecordError(f"zstd frame does not decode: {err}") from None
        else:
            plane = chunk
        if len(plane) != plane_len:
            raise RecordError("plane has the wrong size")
        planes.append(plane)
    if pos != len(stored):
        raise RecordError("stored payload has trailing bytes")
    return join_planes(planes, width, raw_len)
