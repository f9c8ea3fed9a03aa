"""The shape of a Llama-family decoder, read from a GGUF file's metadata or a Hugging Face config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

# rope_type -> the parameters it needs besides rope_theta; anything else is rejected on load.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

    `max_position_embeddings` is the longest context the model accepts. `fingerprint` names the
    exact model that produces a KV cache (architecture, shape, weights and dtype): two models with the
    same fingerprint produce the same keys and values, so blocks keyed by it may be shared.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    architecture: str = "llama"
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta}, {self.rms_norm_eps}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {self.rope_type!r}; supported: {sorted(ROPE_TYPES)}")
        missing = set(ROPE_TYPES[self.rope_type]) - {name for name, _ in self.rope_params}
        if missing:
            raise ValueError(f"rope scaling {self.rope_type!r} needs {sorted(missing)}")

    @property
    def rope(self) -> dict[str, float]:
        """The rope scaling parameters as a dict (empty for the default rope)."""
        return dict(self.rope_params)

    def with_fingerprint(self, weights_digest: str, dtype: torch.dtype) -> ModelConfig:
        """This config with `fingerprint` set from its shape, the weights' digest and the dtype."""
        shape = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "fingerprint"}
        text = json.dumps({"config": shape, "weights": weights_digest, "dtype": str(dtype)}, sort_keys=True, default=str)
        return dataclasses.replace(self, fingerprint=hashlib.sha256(text.encode()).hexdigest()[:32])


def rope_from_hf(hf_config: dict) -> tuple[str, tuple[tuple[str, float], ...], float]:
    """(rope_type, rope_params, rope_theta) from a Hugging Face config of transformers 4 or 5."""
    scaling = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    theta = float(scaling.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {sorted(ROPE_TYPES)}")
    params = tuple(sorted((name, float(scaling[name])) for name in ROPE_TYPES[rope_type] if name in scaling))
    return rope_type, params, theta
