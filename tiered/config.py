"""StoreConfig: what a TieredStore is made of, validated before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policies import make_eviction

from .codecs import make_codec

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
    disk_bytes    capacity of the disk tier
    host_codec    codec of blocks in the host tier ("raw", or a quantizing codec)
    disk_codec    codec of blocks in the disk tier
    eviction      eviction policy name (see policies.EVICTION), one instance per tier
    block_tokens  tokens per block; the last block of a sequence may hold fewer
    layers        layer count of the model, or None: with it, the device tier gives each layer an
                  equal share of its slots, so a sequence's blocks of one layer sit in consecutive
                  slots that attention reads in place; keys' layers must then be below it
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

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes", "block_tokens", "prefetch_threads"):
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
        for name in ("host_codec", "disk_codec", "eviction"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"StoreConfig.{name} must be str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.eviction_kwargs, dict):
            raise TypeError(f"StoreConfig.eviction_kwargs must be dict, got {type(self.eviction_kwargs).__name__}")
        make_codec(self.host_codec)  # unknown names raise ValueError listing the valid ones
        make_codec(self.disk_codec)
        make_eviction(self.eviction, **self.eviction_kwargs)

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
