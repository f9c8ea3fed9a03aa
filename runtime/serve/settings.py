"""ServeSettings: the options of `tiered serve` and of `runtime.serve.app:build(args)`, validated by pydantic.

The same model checks a command line, a YAML file, a Serve config file's `args` and the
TIERED_<SETTING> environment variables (`ServeSettings.load`); an error names the field, the value
and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tiered import StoreConfig, make_codec

MiB = 1 << 20
UNITS = {"_mib": "MiB", "_s": "seconds", "_tokens": "tokens"}  # how a setting's name ends -> its unit
API_KEY_ENV = "TIERED_API_KEY"  # comma-separated keys, when the settings name none
ENV_PREFIX = "TIERED_"  # TIERED_WORKERS=2 sets `workers`


class ServeSettings(BaseModel):
    """What the server runs: the model, its replicas and their stores, and who may call it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("smollm2-135m", description="registered model name, .gguf file or HF directory")
    served_model_name: str | None = Field(None, description="the id clients send as `model` (default: --model)")
    workers: int = Field(1, ge=1, description="SessionReplicas (one per GPU when there are GPUs)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each replica reserves")
    device_mib: int = Field(64, ge=1, description="device tier of each replica, MiB")
    host_mib: int = Field(256, ge=1, description="host tier of each replica, MiB")
    disk_mib: int = Field(1024, ge=1, description="disk tier of each replica, MiB (with disk_dir)")
    disk_dir: str | None = Field(None, description="disk tier directory (a subdirectory per replica)")
    host_codec: str = Field("int8", description="codec of the host tier (a tiered.CODECS spec)")
    disk_codec: str = Field("int8", description="codec of the disk and shared tiers")
    eviction: str = Field("lru", description="eviction policy of every tier (policies.EVICTION)")
    block_tokens: int = Field(64, ge=1, description="tokens per block")
    shared_dir: str | None = Field(None, description="the cluster's shared tier, a directory every node mounts")
    routing: str = Field("prefix-affinity", description="how new conversations are placed (policies.ROUTING)")
    step_tokens: int = Field(512, ge=1, description="tokens one batched forward step of a replica computes at most")
    max_sequences: int = Field(64, ge=1, description="conversations one step of a replica computes at most (1: no batching)")
    api_keys: tuple[str, ...] = Field((), validate_default=True, description=f"bearer keys; empty: {API_KEY_ENV}, else no auth")
    no_reuse: bool = Field(False, description="every request gets its own salt: no prefix is ever reused")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sets none")
    call_timeout_s: float = Field(300.0, gt=0, description="longest a call to a replica may take")
    failover_timeout_s: float = Field(60.0, gt=0, description="how long a request retries while its replica is replaced")
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

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None, **given: Any) -> ServeSettings:
        """Settings from, each overriding the one before: the defaults; the YAML file at `path` (a
        mapping of settings); the TIERED_<SETTING> variables of `env` (default: os.environ), such as
        TIERED_WORKERS=2; and `given`. ValueError for an unreadable file; pydantic's
        ValidationError (naming the field) for a bad value."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as error:
                raise ValueError(f"cannot read {path}: {error}") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
        env = os.environ if env is None else env
        values.update({name: env[cls.env_name(name)] for name in cls.model_fields if cls.env_name(name) in env})
        return cls(**{**values, **given})

    @staticmethod
    def env_name(setting: str) -> str:
        return ENV_PREFIX + setting.upper()

    @classmethod
    def reference(cls) -> str:
        """The Markdown table of every setting (docs/CONFIG.md, after StoreConfig's)."""
        lines = ["## `tiered serve` settings", "",
                 "`tiered serve`'s options (`--workers` for `workers`, ...), its `--config FILE` (YAML), the",
                 "`TIERED_<SETTING>` environment variables and the `args` of `runtime.serve.app:build` in a Serve",
                 "config (deploy/kuberay) are these settings, checked by one pydantic model (options override the",
                 "environment, which overrides the file).", "",
                 "| setting | environment | type | allowed | unit | default | meaning |", "|---|---|---|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            bounds = ", ".join(f"{op} {getattr(m, attr)}" for m in field.metadata
                               for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                               if getattr(m, attr, None) is not None)
            unit = next((u for suffix, u in UNITS.items() if name.endswith(suffix)), "-")
            kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
            cells = [f"`{name}`", f"`{cls.env_name(name)}`", kind, bounds or "any", unit, f"`{field.default!r}`", field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines) + "\n"

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
