"""StoreConfig: what a TieredStore is made of, validated before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policies import make_eviction

from .codecs import make_codec
from .disk.log import DURABILITY_MODES

DISK_WRITE_MODES = ("through", "back")
MiB = 1 << 20
GiB = 1 << 30


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class StoreConfig:
    """Configuration of a TieredStore. Sizes are bytes; a `None` disk_dir means no disk tier.

    device        "cuda", "cuda:N" or "cpu": where the top tier's slot pool lives
    device_bytes  capacity of the device tier (its slot pool is allocated on the first put)
    host_bytes    capacity of the host tier (pinned memory when the device is CUDA)
    disk_dir      directory of the disk tier's segment files, or None for no disk tier
    disk_bytes    capacity of the disk tier: its segment files never exceed it (whole segments,
                  oldest first, are evicted to make room)
    host_codec    codec of blocks in the host tier ("raw", or a quantizing codec)
    disk_codec    codec of blocks in the disk tier
    eviction      eviction policy name (see policies.EVICTION), one instance per tier
    block_tokens  tokens per block; the last block of a sequence may hold fewer
    layers        layer count of the model, or None: with it, the device tier gives each layer an
                  equal share of its slots, so a sequence's blocks of one layer sit in consecutive
                  slots that attention reads in place; keys' layers must then be below it
    fingerprint   the model's identity (architecture, weights hash, ...), recorded in the disk
                  directory with block_tokens, disk_codec and the dtype: a directory written under
                  another identity is refused (tiered.disk.IdentityMismatch); "" until a model sets it
    disk_durability   when the disk tier fsyncs: "record" (every record), "segment" (default: when
                  a segment seals, before compaction deletes one, and on close) or "never". A killed
                  process loses nothing put returned from in any mode; a power loss can lose unsynced
                  records, which then read as misses
    disk_zstd_level   zstd level of disk payloads, 1..22 (1: fastest, and as small as 3 on KV)
    disk_zstd_threads zstd worker threads for payload planes of 1 MiB or more; 0: none
    disk_segment_bytes  a segment file seals past min(this, disk_bytes / 8), and at least 64 KiB
    disk_compact_live_fraction  sealed segments with less live data than this fraction are
                  compacted in the background (0 turns compaction off)
    shared_dir    a directory every replica of a cluster mounts (tiered.shared), below the local
                  tiers, or None: sealed blocks are written through to it, stored in disk_codec,
                  and any store configured with it can read what another wrote
    shared_bytes  the budget of this store's share of the shared directory
    disk_write    "through" (default): a block is written to the disk tier in the background as
                  soon as it is sealed (full and content-addressed), and stays there when promoted,
                  so a crash loses no sealed block and another process can reuse it; "back": blocks
                  reach the disk only when evicted from the host tier
    """

    device: str = field(default_factory=default_device)
    device_bytes: int = 256 * MiB
    host_bytes: int = 1 * GiB
    disk_dir: str | Path | None = None
    disk_bytes: int = 4 * GiB
    host_codec: str = "raw"
    disk_codec: str = "raw"
    eviction: str = "lru"
    eviction_kwargs: dict[str, Any] = field(default_factory=dict)
    block_tokens: int = 64
    layers: int | None = None
    prefetch_threads: int = 1
    fingerprint: str = ""
    disk_durability: str = "segment"
    disk_zstd_level: int = 1
    disk_zstd_threads: int = 0
    disk_segment_bytes: int = 64 * MiB
    disk_compact_live_fraction: float = 0.5
    disk_write: str = "through"
    shared_dir: str | Path | None = None
    shared_bytes: int = 64 * GiB

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes", "block_tokens", "prefetch_threads",
                     "disk_zstd_level", "disk_segment_bytes", "shared_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"StoreConfig.{name} must be int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"StoreConfig.{name} must be > 0, got {value}")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)):
            raise TypeError(f"StoreConfig.layers must be int or None, got {type(self.layers).__name__}")
        if self.layers is not None and self.layers <= 0:
            raise ValueError(f"StoreConfig.layers must be > 0, got {self.layers}")
        if not isinstance(self.device, str):
            raise TypeError(f"StoreConfig.device must be str, got {type(self.device).__name__}")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"StoreConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"StoreConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"StoreConfig.device={self.device!r} but CUDA is not available; use 'cpu'")
        if self.disk_dir is not None and not isinstance(self.disk_dir, (str, Path)):
            raise TypeError(f"StoreConfig.disk_dir must be a path or None, got {type(self.disk_dir).__name__}")
        if self.shared_dir is not None and not isinstance(self.shared_dir, (str, Path)):
            raise TypeError(f"StoreConfig.shared_dir must be a path or None, got {type(self.shared_dir).__name__}")
        for name in ("host_codec", "disk_codec", "eviction"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"StoreConfig.{name} must be str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.eviction_kwargs, dict):
            raise TypeError(f"StoreConfig.eviction_kwargs must be dict, got {type(self.eviction_kwargs).__name__}")
        self._check_disk()
        make_codec(self.host_codec)  # unknown names raise ValueError listing the valid ones
        make_codec(self.disk_codec)
        make_eviction(self.eviction, **self.eviction_kwargs)

    def _check_disk(self) -> None:
        if not isinstance(self.fingerprint, str):
            raise TypeError(f"StoreConfig.fingerprint must be str, got {type(self.fingerprint).__name__}")
        if len(self.fingerprint) > 1024 or not self.fingerprint.isprintable():
            raise ValueError(f"StoreConfig.fingerprint must be printable text of at most 1024 characters, "
                             f"got {self.fingerprint!r}")
        if self.disk_durability not in DURABILITY_MODES:
            raise ValueError(f"StoreConfig.disk_durability must be one of {list(DURABILITY_MODES)}, "
                             f"got {self.disk_durability!r}")
        if not 1 <= self.disk_zstd_level <= 22:
            raise ValueError(f"StoreConfig.disk_zstd_level must be 1..22, got {self.disk_zstd_level}")
        if isinstance(self.disk_zstd_threads, bool) or not isinstance(self.disk_zstd_threads, int):
            raise TypeError(f"StoreConfig.disk_zstd_threads must be int, got {type(self.disk_zstd_threads).__name__}")
        if self.disk_zstd_threads < 0:
            raise ValueError(f"StoreConfig.disk_zstd_threads must be >= 0, got {self.disk_zstd_threads}")
        fraction = self.disk_compact_live_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"StoreConfig.disk_compact_live_fraction must be a float, got {type(fraction).__name__}")
        if self.disk_write not in DISK_WRITE_MODES:
            raise ValueError(f"StoreConfig.disk_write must be one of {list(DISK_WRITE_MODES)}, got {self.disk_write!r}")
        if not 0 <= fraction < 1:
            raise ValueError(f"StoreConfig.disk_compact_live_fraction must be in [0, 1), got {fraction}")

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
