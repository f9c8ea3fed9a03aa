"""File helpers of the disk tier: private directories and files, exact reads. Atomic replaces are
tiered.atomic's (re-exported here for the tier's modules)."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write  # noqa: F401  (re-exported)

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) if needed, and make it 0700."""
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if not directory.is_dir():
        raise ValueError(f"disk tier directory {directory} is not a directory")
    os.chmod(directory, DIR_MODE)


def create_file(path: Path) -> int:
    """A new file open for reading and writing, mode 0600 whatever the umask; FileExistsError if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`; fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pread_into(fd: int, length: int, offset: int) -> bytearray:
    """`length` bytes at `offset` in a new (writable) bytearray; shorter only at the end of the file."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            del view
            del buffer[got:]
            break
        got += n
    return buffer
