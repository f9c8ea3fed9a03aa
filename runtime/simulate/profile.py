"""Hardware profiles: bytes/s and latency of each link, and prefill time per token of a model.

A profile is a YAML file; those shipped live in runtime/simulate/profiles/ and are named by
their stem (`h100-pcie5`, `h200-nvlink-c2c`, `cpu-local`). Any other path to a YAML file works
too. `tiered simulate --calibrate` writes a profile of this machine measured with our kernels.

    name: h200-nvlink-c2c
    description: ...
    model: llama-3.1-8b            # the model the prefill figures are for
    kv_bytes_per_token: 131072     # KV bytes of one token over all layers, keys and values
    prefill_s_per_token: 3.1e-5    # compute time of one prefilled token
    prefill_overhead_s: 0.004      # fixed cost of one prefill (scheduling, launches)
    links:                         # each {bytes_per_s, latency_s}
      hbm: ...                     # device memory
      host_device: ...             # host memory <-> device (PCIe, NVLink-C2C)
      network: ...                 # node <-> the shared tier's node
      disk: ...                    # the shared tier's storage
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import yaml

LINKS = ("hbm", "host_device", "network", "disk")


@dataclass(frozen=True)
class Link:
    """A data path: sustained bandwidth and the latency of one transfer."""

    bytes_per_s: float
    latency_s: float

    def transfer_s(self, nbytes: int, transfers: int = 1) -> float:
        """Seconds to move `nbytes` in `transfers` transfers (0 when there is nothing to move)."""
        if nbytes <= 0:
            return 0.0
        return transfers * self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    model: str
    kv_bytes_per_token: int
    prefill_s_per_token: float
    prefill_overhead_s: float
    links: dict[str, Link]
    description: str = ""

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if not isinstance(self.kv_bytes_per_token, int) or self.kv_bytes_per_token < 1:
            raise ValueError(f"{where}: kv_bytes_per_token must be a positive int, got {self.kv_bytes_per_token!r}")
        for name in ("prefill_s_per_token", "prefill_overhead_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: {name} must be a number >= 0, got {value!r}")
        missing = [link for link in LINKS if link not in self.links]
        if missing:
            raise ValueError(f"{where}: missing link(s) {missing}; a profile names {list(LINKS)}")
        for name, link in self.links.items():
            if not link.bytes_per_s > 0 or not link.latency_s >= 0:
                raise ValueError(f"{where}: link {name} needs bytes_per_s > 0 and latency_s >= 0, got {link}")

    def block_bytes(self, block_tokens: int) -> int:
        """KV bytes of one full block of `block_tokens` tokens."""
        return self.kv_bytes_per_token * block_tokens

    def to_yaml(self) -> str:
        data = asdict(self)
        data["links"] = {name: asdict(link) for name, link in self.links.items()}
        return yaml.safe_dump(data, sort_keys=False)


def shipped_profiles() -> dict[str, Path]:
    """Name -> file of each profile shipped with the package."""
    folder = resources.files("runtime.simulate") / "profiles"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name, or the profile in a YAML file; ValueError naming what is wrong."""
    shipped = shipped_profiles()
    path = shipped.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown profile {str(name_or_path)!r}; shipped profiles: {sorted(shipped)}, or a .yaml path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not YAML ({err})") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: object, where: str = "profile") -> HardwareProfile:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping")
    fields = ("name", "model", "kv_bytes_per_token", "prefill_s_per_token", "prefill_overhead_s", "links")
    missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    links = data["links"]
    if not isinstance(links, dict):
        raise ValueError(f"{where}: links must be a mapping of {list(LINKS)}")
    try:
        parsed = {name: Link(float(v["bytes_per_s"]), float(v["latency_s"])) for name, v in links.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: every link needs numbers bytes_per_s and latency_s ({err})") from None
    unknown = sorted(set(data) - set(fields) - {"description"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    return HardwareProfile(
        name=str(data["name"]),
        model=str(data["model"]),
        kv_bytes_per_token=data["kv_bytes_per_token"],
        prefill_s_per_token=data["prefill_s_per_token"],
        prefill_overhead_s=data["prefill_overhead_s"],
        links=parsed,
        description=str(data.get("description", "")),
    )
