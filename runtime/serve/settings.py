"""ServeSettings: the options of `tiered serve` and of `runtime.serve.app:build(args)`, validated by pydantic.

The same model checks a command line, a Serve config file's `args`, and `TIERED_API_KEY`; an
error names the field, the value and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tiered import StoreConfig, make_codec

MiB = 1 << 20
API_KEY_ENV = "TIERED_API_KEY"  # comma-separated keys, when the settings name none


class ServeSettings(BaseModel):
    """What the server runs: the model, its replicas and their stores, and who may call it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("smollm2-135m", description="registered model name, .gguf file or HF directory")
    served_model_name: str | None = Field(None, description="the id clients send as `model` (default: --model)")
    workers: int = Field(1, ge=1, description="SessionReplicas (one per GPU when there are GPUs)")
    cpus_per_worker: float = Field(1.0, gt=0)
    device_mib: int = Field(64, ge=1, description="device tier of each replica, MiB")
    host_mib: int = Field(256, ge=1, description="host tier of each replica, MiB")
    disk_mib: int = Field(1024, ge=1, description="disk tier of each replica, MiB (with disk_dir)")
    disk_dir: str | None = Field(None, description="disk tier directory (a subdirectory per replica)")
    host_codec: str = "int8"
    disk_codec: str = "int8"
    eviction: str = "lru"
    block_tokens: int = Field(64, ge=1)
    shared_dir: str | None = Field(None, description="the cluster's shared tier, a directory every node mounts")
    routing: str = "prefix-affinity"
    api_keys: tuple[str, ...] = Field((), validate_default=True, description=f"bearer keys; empty: {API_KEY_ENV}, else no auth")
    no_reuse: bool = Field(False, description="every request gets its own salt: no prefix is ever reused")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none")
    call_timeout_s: float = Field(300.0, gt=0)
    failover_timeout_s: float = Field(60.0, gt=0)
    table_key: str = Field("tiered-serve", min_length=1, description="the routing table's name in the ingress")

    @field_validator("host_codec", "disk_codec")
    @classmethod
    def _codec(cls, spec: str) -> str:
        make_codec(spec)  # ValueError naming the valid codecs
        return spec

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, keys):
        if isinstance(keys, str):
            keys = keys.split(",")
        keys = tuple(k.strip() for k in (keys or ()) if k and k.strip())
        return keys or tuple(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())

    @property
    def model_id(self) -> str:
        """The id clients send as `model`: served_model_name, else the model's name (a path's last part)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if "/" in self.model or self.model.endswith(".gguf") else self.model

    def store_config(self) -> StoreConfig:
        return StoreConfig(device="cpu", device_bytes=self.device_mib * MiB, host_bytes=self.host_mib * MiB,
                           disk_dir=self.disk_dir, disk_bytes=self.disk_mib * MiB, host_codec=self.host_codec,
                           disk_codec=self.disk_codec, eviction=self.eviction, block_tokens=self.block_tokens)
