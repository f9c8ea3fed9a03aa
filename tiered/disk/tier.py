"""DiskTier: the bottom tier. Encoded blocks, compressed and checksummed, in a segment log on disk.

The directory (0700; files 0600) holds MANIFEST.json (format version and the identity that wrote
it), seg-NNNNNNNNNN.log segment files, INDEX.snapshot (the index at the last clean close) and
LOCK (held by the one process writing it). A namespace is stored inside records only and never
names a file. Nothing stored is unpickled or torch.load-ed: payloads come back through
np.frombuffer from bytes whose checksums verified.

The tier enforces capacity_bytes itself (evicts_itself): put evicts whole segments, oldest first
(after trying to compact a mostly-dead one), and returns the keys that left. It is thread-safe
on its own; get of a damaged or torn record returns None, counts it, and forgets the key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
import xxhash
from annotated_types import Ge, Le, Lt

from ..block import BlockKey
from ..checked import NonNegative, Positive, checked
from ..codecs import Encoded
from ..tier import Tier
from .compress import Packer, shuffle_width, unpack
from .counters import DiskCounters
from .files import create_file, ensure_private_dir
from .log import DURABILITY_MODES, SegmentLog
from .manifest import (
    MANIFEST_NAME,
    Identity,
    IdentityMismatch,
    read_manifest,
    write_manifest,
)
from .record import (
    DTYPE_NAMES,
    FIXED,
    FLAG_COMPRESSED,
    MAX_DIM,
    MAX_PAYLOAD_BYTES,
    RecordError,
    RecordHeader,
    check_codec_spec,
)
from .segment import segment_name

LOCK_NAME = "LOCK"
MiB = 1 << 20
MIN_SEGMENT_BYTES = 64 << 10
MAX_KEY_INT = (1 << 32) - 1


ZstdLevel = Annotated[int, Ge(1), Le(22)]  # zstd's levels
LiveFraction = Annotated[float, Ge(0), Lt(1)]  # of a sealed segment's bytes still live, below which it is compacted


class DirectoryBusy(RuntimeError):
    """Another DiskTier (in this process or another) has the directory open for writing."""


class DiskTier(Tier):
    """A persistent, self-evicting tier of Encoded blocks in `directory`.

    capacity_bytes         bound on the segment files' total size (metadata files are extra, small)
    codec, block_tokens, fingerprint, and the dtype of the first block: the identity recorded in
                           the directory; opening it under another raises IdentityMismatch
    durability             "record" | "segment" (default) | "never": when data is fdatasync-ed
    zstd_level, zstd_threads   zstd level (1..22) and worker threads for planes of >= 1 MiB
    segment_bytes          a segment seals past min(segment_bytes, capacity_bytes / 8), >= 64 KiB
    compact_live_fraction  sealed segments less live than this are compacted; 0 turns it off
    """

    name = "disk"
    evicts_itself = True
    reads_unlocked = True  # the segment log locks itself
    get_copies = True  # each get reads and unpacks its record anew

    @checked
    def __init__(self, directory: str | Path, capacity_bytes: Positive, *, codec: str = "raw",
                 block_tokens: Positive = 64, fingerprint: str = "", durability: Literal[DURABILITY_MODES] = "segment",
                 zstd_level: ZstdLevel = 1, zstd_threads: NonNegative = 0,
                 segment_bytes: Positive = 64 * MiB, compact_live_fraction: LiveFraction = 0.5) -> None:
        check_codec_spec(codec)
        if len(fingerprint) > 1024 or not fingerprint.isprintable():
            raise ValueError(f"DiskTier fingerprint must be printable text of at most 1024 characters, got {fingerprint!r}")
        self.directory = Path(directory)
        self._capacity_bytes = capacity_bytes
        self._packer = Packer(zstd_level, zstd_threads)
        self._identity = Identity(fingerprint, block_tokens, codec)
        self._closed = False
        self._identity_lock = threading.Lock()
        ensure_private_dir(self.directory)
        self._lock_fd = self._take_lock()
        try:
            self._identity = self._check_identity(self._identity)
            self._remove_temporaries()
            effective_segment_bytes = max(MIN_SEGMENT_BYTES, min(segment_bytes, capacity_bytes // 8))
            self._log = SegmentLog(self.directory, capacity_bytes, effective_segment_bytes, durability,
                                   float(compact_live_fraction))
            self._log.open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ----------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        path = self.directory / LOCK_NAME
        try:
            fd = create_file(path)
        except FileExistsError:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DirectoryBusy(f"{self.directory} is already open for writing by another disk tier") from None
            raise
        return fd

    def _check_identity(self, identity: Identity) -> Identity:
        stored = read_manifest(self.directory)
        if stored is None:
            strangers = [p.name for p in self.directory.iterdir() if p.name != LOCK_NAME]
            if strangers:
                raise ValueError(f"{self.directory} is not empty and has no {MANIFEST_NAME}: it is not a disk "
                                 f"tier directory (found {sorted(strangers)[:5]}); refusing to write into it")
            write_manifest(self.directory, identity)
            return identity
        differences = identity.differences(stored)
        if differences:
            raise IdentityMismatch(f"{self.directory} was written for something else: " + "; ".join(differences)
                                   + ". Use another directory for this model/configuration.")
        return identity if stored.dtype is None else identity.with_dtype(stored.dtype)

    def _remove_temporaries(self) -> None:
        for path in self.directory.iterdir():  # left by a process killed while replacing a file
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)

    # -- the Tier contract ------------------------------------------------------------------------

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._log

    def get(self, key: BlockKey) -> Encoded | None:
        """The stored Encoded (payload a fresh CPU tensor), or None if absent, damaged or torn."""
        found = self._log.read(key)
        if found is None:
            return None
        header, stored, loc = found
        try:
            payload = unpack(stored, header.width, header.raw_len)  # [raw_len] uint8
        except RecordError:
            self._log.drop_damaged(key, loc)
            return None
        return Encoded(header.codec, header.dtype, header.shape, torch.from_numpy(payload))

    def put(self, key: BlockKey, item: Encoded) -> list[BlockKey]:
        """Write `item` under `key`; the keys dropped (whole segments evicted) to make room.

        KeyError if `key` is stored; ValueError/TypeError for an item this directory cannot hold;
        OSError (e.g. ENOSPC) if the write fails: then `key` is not stored and every earlier block
        stays readable (keys of any segment evicted before the failure are reported by the next put).
        """
        header, buffers = self._prepare(key, item)
        return self._log.write(header, buffers)

    def remove(self, key: BlockKey) -> bool:
        return self._log.remove(key)

    def charge(self, item: Encoded) -> int:
        """The uncompressed payload plus the fixed record header (an upper bound of what it stores)."""
        return self.charge_for(item.nbytes)

    def charge_for(self, nbytes: int) -> int:
        return FIXED.size + nbytes

    def held(self, key: BlockKey) -> tuple[int, int] | None:
        """(charge, tokens) of the block stored under `key`, from the index alone; None if absent."""
        loc = self._log.location(key)
        return None if loc is None else (FIXED.size + loc.raw_len, loc.tokens)

    def keys(self) -> Iterator[BlockKey]:
        return iter(self._log.keys())

    def __len__(self) -> int:
        return len(self._log)

    @property
    def used_bytes(self) -> int:
        """Bytes of the segment files."""
        return self._log.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def close(self) -> None:
        """Sync, write the index snapshot, release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._log.close()
        finally:
            os.close(self._lock_fd)

    # -- beyond the contract ----------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def counters(self) -> DiskCounters:
        """What the tier did (a live object)."""
        return self._log.counters

    def sync(self) -> None:
        """Make every record put so far durable, whatever the durability mode but "never"."""
        self._log.sync()

    def compact(self, live_fraction: float | None = None) -> int:
        """Compact now every sealed segment less live than `live_fraction`; segments deleted."""
        return self._log.compact(live_fraction)

    def segment_ids(self) -> list[int]:
        return self._log.segment_ids()

    def record_span(self, key: BlockKey) -> tuple[str, int, int] | None:
        """(segment file name, offset, bytes) of `key`'s record, or None: where to look with a hex editor."""
        loc = self._log.location(key)
        return None if loc is None else (segment_name(loc.segment_id), loc.offset, loc.length)

    # -- internals --------------------------------------------------------------------------------

    def _prepare(self, key: BlockKey, item: Encoded) -> tuple[RecordHeader, list]:
        """Validate `item` and compress its payload: the record header (seq 0) and payload buffers."""
        if not isinstance(key, BlockKey):
            raise TypeError(f"expected a BlockKey, got {type(key).__name__}")
        if key.layer > MAX_KEY_INT or key.index > MAX_KEY_INT:
            raise ValueError(f"the disk tier stores layer and index below 2**32, got {key}")
        if not isinstance(item, Encoded):
            raise TypeError(f"the disk tier stores Encoded payloads, got {type(item).__name__}")
        payload = item.wait().payload  # an asynchronous copy into pinned memory may still be landing
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("Encoded.payload must be a 1-D uint8 tensor")
        if not 0 < payload.numel() <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"Encoded.payload must have 1..{MAX_PAYLOAD_BYTES} bytes, got {payload.numel()}")
        dtype_name = DTYPE_NAMES.get(item.dtype)
        if dtype_name is None:
            raise TypeError(f"Encoded.dtype must be one of {sorted(DTYPE_NAMES.values())}, got {item.dtype}")
        shape = item.shape
        if (not isinstance(shape, tuple) or len(shape) != 3
                or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM for d in shape)):
            raise ValueError(f"Encoded.shape must be (kv_heads, tokens, head_dim) of positive ints, got {shape!r}")
        if item.codec != self._identity.codec:
            raise ValueError(f"this disk directory holds {self._identity.codec!r} payloads, got {item.codec!r}")
        self._fix_dtype(dtype_name)
        if payload.device.type != "cpu":
            payload = payload.cpu()
        array = (payload if payload.is_contiguous() else payload.contiguous()).numpy()  # [nbytes] uint8
        width = shuffle_width(item.codec, item.dtype)
        if array.nbytes % width:
            width = 1
        packed = self._packer.pack(array, width, item.codec)
        hasher = xxhash.xxh3_64()
        for buffer in packed.buffers:
            hasher.update(buffer)
        header = RecordHeader(key, item.codec, item.dtype, shape, FLAG_COMPRESSED if packed.compressed else 0,
                              width, packed.stored_len, array.nbytes, 0, hasher.intdigest())
        return header, packed.buffers

    def _fix_dtype(self, dtype_name: str) -> None:
        """The first block fixes the directory's dtype (recorded in the manifest); others must match."""
        with self._identity_lock:
            identity = self._identity
            if identity.dtype == dtype_name:
                return
            if identity.dtype is not None:
                raise TypeError(f"this disk directory holds {identity.dtype} blocks, got {dtype_name}")
            identity = identity.with_dtype(dtype_name)
            write_manifest(self.directory, identity)
            self._identity = identity
