"""StoreConfig: what a TieredStore is made of, validated before anything is allocated.

Each option is declared once: its type and bounds (checked by tiered.checked, with pydantic, strictly: a
Python value is never coerced), its default, and its meaning. docs/CONFIG.md is generated from these declarations
(`tiered.config.reference()`), with the unit that each option's name carries.
`StoreConfig.load` reads options from a YAML file and from TIERED_* environment variables.
Errors name the option, the value and what was expected: TypeError for a value of the wrong type,
ValueError for one out of range.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

from policies import make_eviction

from .checked import (
    NonNegative,
    PathOrNone,
    Positive,
    bounds,
    check_values,
    from_env,
    from_file,
    read_yaml,
    schema,
    type_name,
)
from .codecs import make_codec
from .disk.log import DURABILITY_MODES
from .disk.tier import LiveFraction, ZstdLevel

DISK_WRITE_MODES = ("through", "back")
MiB = 1 << 20
GiB = 1 << 30
ENV_PREFIX = "TIERED_"
SECTIONS = ("store", "cluster")  # the sections of a file of options: StoreConfig's, and a Cluster's

# how an option's name ends -> the unit of its value
UNITS = {"_bytes": "bytes", "_tokens": "tokens", "_threads": "threads", "_s": "seconds", "_fraction": "fraction"}
SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*")
SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def doc(meaning: str, *, default: str | None = None, allowed: str | None = None) -> dict[str, str | None]:
    """A StoreConfig field's metadata: its meaning, and, for docs/CONFIG.md, its default and allowed
    values in words where its declaration does not say them."""
    return {"doc": meaning, "default_doc": default, "allowed": allowed}


@dataclass(frozen=True)
class StoreConfig:
    """Configuration of a TieredStore. Sizes are bytes; a `None` disk_dir means no disk tier. Every
    option, with its unit and default: docs/CONFIG.md."""

    device: str = field(default_factory=default_device, metadata=doc(
        '"cuda", "cuda:N" or "cpu": where the top tier\'s slot pool lives',
        default='"cuda" when CUDA is available, else "cpu"', allowed="cpu, cuda, cuda:N"))
    device_bytes: Positive = field(default=256 * MiB, metadata=doc(
        "capacity of the device tier (its slot pool is allocated on the first put)"))
    host_bytes: Positive = field(default=1 * GiB, metadata=doc(
        "capacity of the host tier (pinned memory when the device is CUDA)"))
    disk_dir: PathOrNone = field(default=None, metadata=doc(
        "directory of the disk tier's segment files, or None for no disk tier"))
    disk_bytes: Positive = field(default=4 * GiB, metadata=doc(
        "capacity of the disk tier: its segment files never exceed it (whole segments, oldest first, are "
        "evicted to make room)"))
    host_codec: str = field(default="raw", metadata=doc(
        'codec of blocks in the host tier ("raw", or a quantizing codec such as "int8" or "int4:g32")',
        allowed="a codec spec (tiered.CODECS)"))
    disk_codec: str = field(default="raw", metadata=doc(
        "codec of blocks in the disk tier (and the shared tier)", allowed="a codec spec (tiered.CODECS)"))
    eviction: str = field(default="lru", metadata=doc(
        "eviction policy name, one instance per tier", allowed="a name in policies.EVICTION"))
    eviction_kwargs: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "keyword arguments of the eviction policy", default="{}"))
    block_tokens: Positive = field(default=64, metadata=doc(
        "tokens per block; the last block of a sequence may hold fewer"))
    layers: Positive | None = field(default=None, metadata=doc(
        "layer count of the model, or None: with it, the device tier gives each layer an equal share of its "
        "slots, so a sequence's blocks of one layer sit in consecutive slots that attention reads in place; "
        "keys' layers must then be below it"))
    fingerprint: str = field(default="", metadata=doc(
        "the model's identity (architecture, weights hash, ...), recorded in the disk directory with "
        "block_tokens, disk_codec and the dtype: a directory written under another identity is refused; "
        '"" until a model sets it', allowed="printable, at most 1024 characters"))
    disk_durability: Literal[DURABILITY_MODES] = field(default="segment", metadata=doc(
        'when the disk tier fsyncs: "record" (every record), "segment" (when a segment seals, before '
        'compaction deletes one, and on close) or "never". A killed process loses nothing put returned from '
        "in any mode; a power loss can lose unsynced records, which then read as misses"))
    disk_zstd_level: ZstdLevel = field(default=1, metadata=doc(
        "zstd level of disk payloads (1: fastest, and as small as 3 on KV)"))
    disk_zstd_threads: NonNegative = field(default=0, metadata=doc(
        "zstd worker threads for payload planes of 1 MiB or more; 0: none"))
    disk_segment_bytes: Positive = field(default=64 * MiB, metadata=doc(
        "a segment file seals past min(this, disk_bytes / 8), and at least 64 KiB"))
    disk_compact_live_fraction: LiveFraction = field(default=0.5, metadata=doc(
        "sealed segments with less live data than this fraction are compacted in the background (0 turns "
        "compaction off)"))
    disk_write: Literal[DISK_WRITE_MODES] = field(default="through", metadata=doc(
        '"through": a block is written to the disk tier in the background as soon as it is sealed (full and '
        "content-addressed), and stays there when promoted, so a crash loses no sealed block and another "
        'process can reuse it; "back": blocks reach the disk only when evicted from the host tier'))
    shared_dir: PathOrNone = field(default=None, metadata=doc(
        "a directory every replica of a cluster mounts (tiered.shared), below the local tiers, or None: "
        "sealed blocks are written through to it, stored in disk_codec, and any store configured with it "
        "can read what another wrote"))
    shared_bytes: Positive = field(default=64 * GiB, metadata=doc(
        "the budget of the whole shared directory: past it, the least recently used blocks are deleted "
        "(a deleted block is a miss, recomputed)"))

    def __post_init__(self) -> None:
        check_values(_schema(), _hints(), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                     "StoreConfig.")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"StoreConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"StoreConfig.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"StoreConfig.device={self.device!r} but CUDA is not available; use 'cpu'")
        if len(self.fingerprint) > 1024 or not self.fingerprint.isprintable():
            raise ValueError(f"StoreConfig.fingerprint must be printable text of at most 1024 characters, "
                             f"got {self.fingerprint!r}")
        make_codec(self.host_codec)  # unknown names raise ValueError listing the valid ones
        make_codec(self.disk_codec)
        make_eviction(self.eviction, **self.eviction_kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None,
             base: Mapping[str, Any] | None = None, **overrides: Any) -> StoreConfig:
        """A StoreConfig from, each overriding the one before: the defaults; `base` (a caller's own
        defaults); the YAML file at `path` (a mapping of option names, or sections: StoreConfig's under
        `store:`, a cluster's under `cluster:`, which runtime.Cluster.options reads);
        the TIERED_<OPTION> variables of `env` (default: os.environ), such as TIERED_HOST_BYTES=4GiB;
        and `overrides`. Sizes (`*_bytes`) may be written with a unit in the file and the
        environment: 512MiB, 4 GiB. An unknown option is an error."""
        values: dict[str, Any] = dict(base or {})
        if path is not None:
            values.update(_from_yaml(Path(path)))
        values.update(_from_env(os.environ if env is None else env))
        values.update(overrides)
        return cls(**values)

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device


@cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(StoreConfig, include_extras=True)


@cache
def _schema():
    return schema("StoreConfig", _hints())


def _from_yaml(path: Path) -> dict[str, Any]:
    loaded = read_yaml(path)
    if loaded is None:
        return {}
    if isinstance(loaded, dict) and set(loaded) & set(SECTIONS):  # options in sections: StoreConfig's under store
        loaded = loaded.get("store")
    loaded = from_file(loaded, _hints(), f"{path} (StoreConfig)")
    return {name: _size(name, value, f"{path}: {name}") for name, value in loaded.items()}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Options from TIERED_<OPTION> variables; sizes may carry a unit (TIERED_HOST_BYTES=4GiB)."""
    return {name: _size(name, value, ENV_PREFIX + name.upper())
            for name, value in from_env(_hints(), env, ENV_PREFIX).items()}


def _size(name: str, value: Any, where: str) -> Any:
    """A `*_bytes` option written with a unit (512MiB, 4 GiB) as its count of bytes; other values as given."""
    if not name.endswith("_bytes") or not isinstance(value, str):
        return value
    match = SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"{where}: StoreConfig.{name} must be a size such as 4096, 512MiB or 4GiB, got {value!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def _unit(name: str) -> str:
    return next((unit for suffix, unit in UNITS.items() if name.endswith(suffix)), "")


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_doc"):
        return f.metadata["default_doc"]
    value = f.default
    if isinstance(value, int) and not isinstance(value, bool) and f.name.endswith("_bytes"):
        for unit in ("TiB", "GiB", "MiB", "KiB"):
            if value % SIZE_UNITS[unit] == 0:
                return f"{value // SIZE_UNITS[unit]} {unit}"
    return repr(value)


def reference() -> str:
    """The Markdown table of every StoreConfig option (docs/CONFIG.md)."""
    hints = _hints()
    lines = [
        "# Configuration",
        "",
        "Generated from `tiered/config.py` (`tiered.config.reference()`); a test keeps it in sync.",
        "`StoreConfig` options come from Python (`StoreConfig(...)`, `dataclasses.replace`), from a YAML",
        "file (`StoreConfig.load(path)`: a mapping of options, or one under `store:`) and from `TIERED_<OPTION>`",
        "environment variables (`TIERED_HOST_BYTES=4GiB`), each overriding the one before. Sizes (`*_bytes`)",
        "may carry a unit in a file or the environment (B, KiB, MiB, GiB, TiB). A bad value is refused with",
        "the option, the value and what was expected.",
        "",
        "| option | environment | type | allowed | unit | default | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(StoreConfig):
        hint = hints[f.name]
        cells = [f"`{f.name}`", f"`{ENV_PREFIX}{f.name.upper()}`", type_name(hint), f.metadata["allowed"] or bounds(hint) or "any",
                 _unit(f.name) or "-", f"`{_default_text(f)}`", f.metadata["doc"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
