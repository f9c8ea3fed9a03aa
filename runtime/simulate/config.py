"""One simulated configuration, and sweeps: the cross product of several values per option."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields

from policies import EVICTION, ROUTING, WRITE


@dataclass(frozen=True)
class SimConfig:
    """What `tiered simulate` models. Capacities are in blocks; 0 means the tier is absent.

    workers          replicas, each with its own device and host tiers
    device_blocks    per worker, accelerator memory
    host_blocks      per worker, host memory
    disk_blocks      one shared tier every worker reads and writes (a disk all nodes mount)
    eviction         policy of every tier; host_eviction / disk_eviction override it per tier
    write            when a block gets a copy in the tier below (see policies.write)
    hit_threshold    reads before write-through-selective writes a block down
    routing          which worker serves a request (see policies.routing)
    profile          hardware profile name or YAML path (see runtime.simulate.profile)
    """

    workers: int = 1
    device_blocks: int = 4096
    host_blocks: int = 0
    disk_blocks: int = 0
    eviction: str = "lru"
    host_eviction: str | None = None
    disk_eviction: str | None = None
    write: str = "write-back"
    hit_threshold: int = 2
    routing: str = "prefix-affinity"
    profile: str = "h200-nvlink-c2c"

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        for name in ("device_blocks", "host_blocks", "disk_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: no such tier), got {value!r}")
        for name in ("eviction", "host_eviction", "disk_eviction"):
            value = getattr(self, name)
            if value is not None and value not in EVICTION:
                raise ValueError(f"unknown {name} {value!r}; valid names: {sorted(EVICTION)}")
        if self.write not in WRITE:
            raise ValueError(f"unknown write {self.write!r}; valid names: {sorted(WRITE)}")
        if self.routing not in ROUTING:
            raise ValueError(f"unknown routing {self.routing!r}; valid names: {sorted(ROUTING)}")
        if not isinstance(self.hit_threshold, int) or self.hit_threshold < 1:
            raise ValueError(f"hit_threshold must be an int >= 1, got {self.hit_threshold!r}")

    def as_row(self) -> dict:
        """The configuration as the leading columns of a results row."""
        row = asdict(self)
        row["host_eviction"] = self.host_eviction or self.eviction
        row["disk_eviction"] = self.disk_eviction or self.eviction
        return row


SWEEPABLE = tuple(f.name for f in fields(SimConfig))


def sweep(**values: tuple) -> list[SimConfig]:
    """Every combination of the given values, one SimConfig each, in a stable order (the last
    option varies fastest). Each keyword is a SimConfig field and takes a tuple of values."""
    unknown = sorted(set(values) - set(SWEEPABLE))
    if unknown:
        raise ValueError(f"cannot sweep {unknown}; options: {list(SWEEPABLE)}")
    names = [name for name in SWEEPABLE if name in values]
    return [SimConfig(**dict(zip(names, combo))) for combo in itertools.product(*(values[n] for n in names))]
