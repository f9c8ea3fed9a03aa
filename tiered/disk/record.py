"""The on-disk record: a fixed header, the key and codec strings, then the stored payload.

Layout (little-endian), FIXED.size = 64 bytes:

    magic         4s   LIVE_MAGIC, or DEAD_MAGIC once the record was removed or moved
    version       u16  RECORD_VERSION
    flags         u8   FLAG_COMPRESSED when some plane of the payload is zstd-compressed
    width         u8   byte-shuffle width of the payload: 1 (none) or 2 (16-bit floats)
    ns_len        u16  bytes of the namespace (UTF-8)
    codec_len     u8   bytes of the codec spec (ASCII)
    dtype_len     u8   bytes of the dtype name (ASCII)
    layer, index  u32  the rest of the BlockKey
    kv_heads, tokens, head_dim  u32  shape of the decoded block
    stored_len    u32  bytes of the stored payload that follow the strings
    raw_len       u32  bytes of the Encoded payload before compression
    seq           u64  write sequence number: the highest seq of a key is its current record
    payload_sum   u64  xxh3-64 of the stored payload
    header_sum    u64  xxh3-64 of the header from `version` to `payload_sum` plus the strings

The two checksums together cover every byte of the record except the magic (so that a record
can be marked dead in place); a magic that is neither LIVE nor DEAD is damage. Lengths are
checked against fixed bounds before anything is read or allocated for them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import xxhash

from ..block import BlockKey, MAX_NAMESPACE_CHARS

LIVE_MAGIC = b"TKV\xa5"
DEAD_MAGIC = b"TKV\x5a"  # differs from LIVE_MAGIC in all 8 bits of its last byte
RECORD_VERSION = 1
FLAG_COMPRESSED = 1
FLAG_KNOWN = FLAG_COMPRESSED

FIXED = struct.Struct("<4sHBBHBBIIIIIIIQQQ")
HEADER_SUM_START = 4  # the magic is left out of header_sum
HEADER_SUM_END = FIXED.size - 8  # header_sum itself is left out

MAX_NS_BYTES = 4 * MAX_NAMESPACE_CHARS
MAX_DTYPE_BYTES = 32
MAX_PAYLOAD_BYTES = 1 << 30  # bound on stored_len and raw_len: no block comes near it
MAX_DIM = 1 << 24  # bound on each of kv_heads, tokens, head_dim
SHUFFLE_WIDTHS = (1, 2)

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class RecordError(ValueError):
    """A record that cannot be trusted: damaged, torn or malformed. `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordHeader(NamedTuple):
    """Everything a record says about itself, except its payload bytes (a tuple: cheap to make)."""

    key: BlockKey
    codec: str
    dtype: torch.dtype
    shape: tuple[int, int, int]  # [kv_heads, tokens, head_dim] of the decoded block
    flags: int
    width: int
    stored_len: int
    raw_len: int
    seq: int
    payload_sum: int

    @property
    def header_len(self) -> int:
        """Bytes of the fixed header plus the strings."""
        return FIXED.size + len(self.key.namespace.encode()) + len(self.codec) + len(DTYPE_NAMES[self.dtype])

    @property
    def length(self) -> int:
        """Bytes of the whole record."""
        return self.header_len + self.stored_len


class Fixed(NamedTuple):
    """The fixed part of a header, bounds-checked but not yet checksum-verified."""

    dead: bool
    var_len: int  # bytes of the strings that follow the fixed part
    stored_len: int
    fields: tuple

    @property
    def header_len(self) -> int:
        return FIXED.size + self.var_len

    @property
    def length(self) -> int:
        return self.header_len + self.stored_len


def payload_checksum(payload) -> int:
    """xxh3-64 of a bytes-like payload."""
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(header: RecordHeader, seq: int | None = None) -> bytes:
    """The header's bytes (fixed part and strings) with its checksum, magic LIVE; `seq` overrides header.seq."""
    ns = header.key.namespace.encode()
    codec = header.codec.encode("ascii")
    dtype = DTYPE_NAMES[header.dtype].encode("ascii")
    kv_heads, tokens, head_dim = header.shape
    fixed = FIXED.pack(
        LIVE_MAGIC, RECORD_VERSION, header.flags, header.width, len(ns), len(codec), len(dtype),
        header.key.layer, header.key.index, kv_heads, tokens, head_dim,
        header.stored_len, header.raw_len, header.seq if seq is None else seq, header.payload_sum, 0,
    )
    strings = ns + codec + dtype
    hasher = xxhash.xxh3_64(fixed[HEADER_SUM_START:HEADER_SUM_END])
    hasher.update(strings)
    return fixed[:HEADER_SUM_END] + struct.pack("<Q", hasher.intdigest()) + strings


def check_codec_spec(codec: str) -> None:
    """Raise ValueError unless `codec` can be recorded (printable ASCII, 1..255 bytes)."""
    if not isinstance(codec, str) or not codec or len(codec) > 255 or not codec.isascii() or not codec.isprintable():
        raise ValueError(f"codec spec must be 1..255 printable ASCII characters, got {codec!r}")


def parse_fixed(buf) -> Fixed:
    """Bounds-check the FIXED.size bytes at the start of `buf`; RecordError if they are not a header."""
    if len(buf) < FIXED.size:
        raise RecordError("torn: header cut short by the end of the file")
    fields = FIXED.unpack_from(buf)
    magic, version, flags, width, ns_len, codec_len, dtype_len = fields[:7]
    stored_len, raw_len = fields[12], fields[13]
    if magic not in (LIVE_MAGIC, DEAD_MAGIC):
        raise RecordError("bad magic")
    if version != RECORD_VERSION:
        raise RecordError(f"unknown record version {version}")
    if flags & ~FLAG_KNOWN or width not in SHUFFLE_WIDTHS:
        raise RecordError(f"unknown flags {flags:#x} or shuffle width {width}")
    if not 1 <= ns_len <= MAX_NS_BYTES or not 1 <= dtype_len <= MAX_DTYPE_BYTES or codec_len < 1:
        raise RecordError(f"absurd string lengths ({ns_len}, {codec_len}, {dtype_len})")
    if stored_len > MAX_PAYLOAD_BYTES or raw_len > MAX_PAYLOAD_BYTES or raw_len % width:
        raise RecordError(f"absurd payload lengths (stored {stored_len}, raw {raw_len})")
    if any(not 1 <= dim <= MAX_DIM for dim in fields[9:12]):
        raise RecordError(f"absurd shape {fields[9:12]}")
    return Fixed(magic == DEAD_MAGIC, ns_len + codec_len + dtype_len, stored_len, fields)


def parse_header(fixed: Fixed, buf) -> RecordHeader:
    """The header whose fixed part is `fixed` and whose bytes start `buf` (at least header_len)."""
    if len(buf) < fixed.header_len:
        raise RecordError("torn: header strings cut short by the end of the file")
    hasher = xxhash.xxh3_64(memoryview(buf)[HEADER_SUM_START:HEADER_SUM_END])
    hasher.update(memoryview(buf)[FIXED.size : fixed.header_len])
    f = fixed.fields
    if hasher.intdigest() != f[16]:
        raise RecordError("header checksum mismatch")
    ns_len, codec_len = f[4], f[5]
    strings = bytes(memoryview(buf)[FIXED.size : fixed.header_len])
    try:
        namespace = strings[:ns_len].decode()
        codec = strings[ns_len : ns_len + codec_len].decode("ascii")
        dtype = DTYPES[strings[ns_len + codec_len :].decode("ascii")]
        key = BlockKey(namespace, f[7], f[8])
    except (UnicodeDecodeError, KeyError, ValueError, TypeError) as err:
        raise RecordError(f"malformed header strings: {err}") from None
    return RecordHeader(
        key=key, codec=codec, dtype=dtype, shape=(f[9], f[10], f[11]), flags=f[2], width=f[3],
        stored_len=f[12], raw_len=f[13], seq=f[14], payload_sum=f[15],
    )


def parse_record(buf) -> tuple[RecordHeader, memoryview]:
    """Header and stored payload of the whole record in `buf`, every checksum verified.

    RecordError if the record is damaged, torn, or marked dead.
    """
    fixed = parse_fixed(buf)
    if fixed.dead:
        raise RecordError("dead: the record was removed or moved")
    header = parse_header(fixed, buf)
    if len(buf) < fixed.length:
        raise RecordError("torn: payload cut short by the end of the file")
    payload = memoryview(buf)[fixed.header_len : fixed.length]
    if payload_checksum(payload) != header.payload_sum:
        raise RecordError("payload checksum mismatch")
    return header, payload
