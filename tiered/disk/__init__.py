"""The disk tier: a log-structured, zstd-compressed, checksummed store of Encoded blocks.

record.py   the record format and its checksums     segment.py   segment files, append and scan
compress.py byte-shuffle + zstd per byte plane      index.py     key -> location, live bytes
log.py      segments, space, eviction, compaction   recovery.py  rebuilding the index on open
snapshot.py the index snapshot                      manifest.py  the directory's identity
tier.py     DiskTier, the Tier over all of it       inspect.py   listing and verifying a directory
"""

from .counters import DiskCounters
from .inspect import DirReport, inspect_dir
from .log import DURABILITY_MODES
from .manifest import Identity, IdentityMismatch
from .tier import DirectoryBusy, DiskTier

__all__ = [
    "DURABILITY_MODES",
    "DirReport",
    "DirectoryBusy",
    "DiskCounters",
    "DiskTier",
    "Identity",
    "IdentityMismatch",
    "inspect_dir",
]
