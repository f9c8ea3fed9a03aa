"""The shared tier: a directory every node mounts (NFS, a PersistentVolume; a temporary directory
in tests) that the stores of every replica read and write, below their local tiers.

One file per block, written atomically (tiered.atomic) in the disk tier's record format (a
checksummed header naming key, codec, dtype and shape, then the payload, uncompressed): a torn
or damaged file reads as a miss, never as wrong data, and nothing is unpickled. Content-
addressed blocks (tiered.content) live under `blocks/`, shared by every store; they are
immutable, so concurrent writers of one key write the same bytes and the last rename wins. Blocks
of one store's own sequences live under `private/<store id>/` and are deleted when it closes.

A store learns of blocks other stores wrote by asking (`lookup`), not by listing the directory:
`keys()` yields only what this instance wrote or looked up.

`capacity_bytes` bounds the whole directory. After every `capacity_bytes / TRIM_FRACTION` bytes
it writes, an instance lists the directory and deletes the least recently used files (by
modification time, which a read refreshes) until what is left fits; other instances trim the same
way, so the directory stays within the budget of whichever is smallest, give or take what is
written between trims. A deleted block is a miss for every store, recomputed from its token log,
never wrong data; a file being read when it is deleted is read whole (POSIX keeps it while open).

Another backend (an object store, Mooncake/LMCache-style remote memory) is one more file that
keeps this contract: content keys global, put idempotent, get verified, lookup on demand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .block import BlockKey
from .checked import Positive, checked
from .codecs import Encoded
from .content import is_content_key
from .disk.record import (
    DTYPE_NAMES,
    RecordError,
    RecordHeader,
    pack_header,
    parse_fixed,
    parse_header,
    parse_record,
    payload_checksum,
)
from .tier import Tier

SUFFIX = ".blk"
TRIM_FRACTION = 16  # trim after writing this fraction of the capacity


class SharedTier(Tier):
    """root            the shared directory (created if absent)
    capacity_bytes  the budget of the whole directory (see the module docstring)
    codec           spec of the codec blocks are stored in; a block of another codec is a miss"""

    name = "shared"
    evicts_itself = True  # trims the directory by recency: see the module docstring
    get_copies = True  # each get reads its file anew

    @checked
    def __init__(self, root: str | Path, capacity_bytes: Positive, codec: str = "raw") -> None:
        self.root = Path(root)
        self.codec = codec
        self._capacity_bytes = capacity_bytes
        self._private = self.root / "private" / uuid.uuid4().hex
        (self.root / "blocks").mkdir(parents=True, exist_ok=True, mode=0o700)
        self._private.mkdir(parents=True, mode=0o700)
        self._sizes: dict[BlockKey, int] = {}  # keys this instance wrote or found -> file bytes
        self._tokens: dict[BlockKey, int] = {}
        self._written_bytes = 0  # since the last trim

    def path_of(self, key: BlockKey) -> Path:
        """The file of `key`: under blocks/ for content keys, under this store's private/ otherwise."""
        digest = hashlib.sha256(f"{key.namespace}\0{key.layer}\0{key.index}".encode()).hexdigest()
        if is_content_key(key):
            return self.root / "blocks" / digest[:2] / f"{digest}{SUFFIX}"
        return self._private / f"{digest}{SUFFIX}"

    def lookup(self, key: BlockKey) -> bool:
        """True if the directory holds a valid header for `key` in this tier's codec (written by
        any store); the key is then known to this instance (keys(), used_bytes)."""
        if key in self._sizes:
            return True
        header = self._read_header(self.path_of(key))
        if header is None or header.key != key or header.codec != self.codec:
            return False
        self._sizes[key] = header.length
        self._tokens[key] = header.shape[1]
        return True

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._sizes or self.lookup(key)

    def get(self, key: BlockKey) -> Encoded | None:
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except OSError:
            self._forget(key)
            return None
        try:
            header, payload = parse_record(data)
        except RecordError:
            self._forget(key)
            return None
        if header.key != key or header.codec != self.codec:
            self._forget(key)
            return None
        self._sizes[key], self._tokens[key] = header.length, header.shape[1]
        _touch(path)  # recently used: the last to be trimmed
        array = np.frombuffer(payload, dtype=np.uint8).copy()
        return Encoded(codec=header.codec, dtype=header.dtype, shape=header.shape, payload=torch.from_numpy(array))

    def put(self, key: BlockKey, item: Encoded) -> list[BlockKey]:
        if not isinstance(item, Encoded):
            raise TypeError(f"the shared tier stores Encoded blocks, got {type(item).__name__}")
        payload = item.wait().payload.to("cpu").contiguous().numpy().tobytes()
        header = RecordHeader(key=key, codec=item.codec, dtype=item.dtype, shape=tuple(item.shape), flags=0, width=1,
                              stored_len=len(payload), raw_len=len(payload), seq=0, payload_sum=payload_checksum(payload))
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, pack_header(header) + payload)
        self._sizes[key], self._tokens[key] = header.length, item.shape[1]
        self._written_bytes += header.length
        if self._written_bytes * TRIM_FRACTION < self._capacity_bytes:
            return []
        return [gone for gone in self.trim() if gone != key]

    def trim(self) -> list[BlockKey]:
        """Delete the least recently used files of the directory until it fits in capacity_bytes;
        returns the keys known to this instance that went (they are forgotten)."""
        self._written_bytes = 0
        files = []  # (mtime_ns, bytes, path) of every block file, any store's
        for directory in [*sorted((self.root / "blocks").iterdir()), *sorted((self.root / "private").iterdir())]:
            try:
                entries = list(os.scandir(directory))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for entry in entries:
                try:
                    if entry.name.endswith(SUFFIX):
                        status = entry.stat()
                        files.append((status.st_mtime_ns, status.st_size, Path(entry.path)))
                except FileNotFoundError:  # deleted meanwhile by another store
                    continue
        excess = sum(size for _, size, _ in files) - self._capacity_bytes
        if excess <= 0:
            return []
        known = {self.path_of(key): key for key in self._sizes}
        gone = []
        for _, size, path in sorted(files):
            if excess <= 0:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            excess -= size
            if path in known:
                gone.append(known[path])
                self._forget(known[path])
        return gone

    def remove(self, key: BlockKey) -> bool:
        known = self._forget(key)
        try:
            self.path_of(key).unlink()
            return True
        except FileNotFoundError:
            return known

    def charge(self, item: Encoded) -> int:
        return self.charge_for(item.nbytes) + len(item.codec) + len(DTYPE_NAMES.get(item.dtype, ""))

    def charge_for(self, nbytes: int) -> int:
        return nbytes + 64 + 64  # the fixed header and (at most) a content namespace

    def held(self, key: BlockKey) -> tuple[int, int] | None:
        if not self.lookup(key):
            return None
        return self._sizes[key], self._tokens[key]

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._sizes))

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def capacity_bytes(self) -> int:
        return self._capacity_bytes

    def sync(self) -> None:
        """Nothing to do: every put is durable when it returns (atomic_write fsyncs)."""

    def close(self) -> None:
        shutil.rmtree(self._private, ignore_errors=True)
        self._sizes.clear()
        self._tokens.clear()

    def _forget(self, key: BlockKey) -> bool:
        self._tokens.pop(key, None)
        return self._sizes.pop(key, None) is not None

    @staticmethod
    def _read_header(path: Path) -> RecordHeader | None:
        try:
            with open(path, "rb") as file:
                head = file.read(4096)
            fixed = parse_fixed(head)
            if fixed.dead:
                return None
            header = parse_header(fixed, head)
            if os.path.getsize(path) != fixed.length:
                return None
            return header
        except (OSError, RecordError):
            return None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # deleted meanwhile, or a read-only mount: recency is then the writer's
        pass
