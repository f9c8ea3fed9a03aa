"""Load a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) of a Llama,
Mistral or Qwen2 model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import Checkpoint, check_tensors
from .config import ModelConfig, rope_from_hf
from .tokenizer import Tokenizer

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_hf_header(directory: Path) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer from a Hugging Face directory, without reading its weights."""
    directory = Path(directory)
    hf_config, config = _read_config(directory)
    return config, Tokenizer.from_hf_dir(directory, hf_config)


def load_hf_dir(directory: Path) -> Checkpoint:
    """The checkpoint in a Hugging Face model directory."""
    directory = Path(directory)
    hf_config, config = _read_config(directory)
    config_path = directory / "config.json"
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    digest = hashlib.sha256(config_path.read_bytes())
    tensors = {}
    for path in files:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        try:
            tensors.update(load_file(str(path)))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    tokenizer = Tokenizer.from_hf_dir(directory, hf_config)
    return Checkpoint(config, check_tensors(config, tensors, str(directory)), tokenizer, digest.hexdigest())


def _read_config(directory: Path) -> tuple[dict, ModelConfig]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json (expected a Hugging Face model directory)")
    hf_config = json.loads(config_path.read_text())
    return hf_config, hf_model_config(hf_config, str(directory))


def hf_model_config(hf_config: dict, source: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json` of a supported model type."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {list(HF_MODEL_TYPES)}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: unsupported hidden_act {hf_config['hidden_act']!r}; supported: ['silu']")
    if hf_config.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=True is not supported")
    rope_type, rope_params, rope_theta = rope_from_hf(hf_config)
    heads, hidden = int(hf_config["num_attention_heads"]), int(hf_config["hidden_size"])
    max_positions = int(hf_config.get("max_position_embeddings", 2048))
    # Full attention equals sliding-window attention while the context fits in the window, so a model
    # with a window is exact up to that many tokens: that is its maximum context here.
    window = hf_config.get("sliding_window")
    if window is not None and (model_type != "qwen2" or hf_config.get("use_sliding_window", False)):
        max_positions = min(max_positions, int(window))
    return ModelConfig(
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf_config["intermediate_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        rope_theta=rope_theta,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        architecture=model_type,
        rope_type=rope_type,
        rope_params=rope_params,
    )
