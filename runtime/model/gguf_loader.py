"""Load a llama.cpp GGUF file: dequantize its tensors, undo llama.cpp's q/k row permutation, and
build its tokenizer. The result is cached (see cache.py), so only the first load pays for this."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from .cache import load_cached, load_cached_header, store_cached
from .checkpoint import Checkpoint, check_tensors
from .config import ModelConfig
from .tokenizer import Tokenizer

# GGUF architecture -> whether llama.cpp's converter permuted the q/k rows for its rotary layout.
GGUF_ARCHITECTURES: dict[str, bool] = {"llama": True}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_gguf(path: Path) -> Checkpoint:
    """The checkpoint in the GGUF file at `path`, from the weight cache when it has it."""
    path = Path(path)
    digest = file_digest(path)
    cached = load_cached(digest)
    if cached is not None:
        return cached
    checkpoint = read_gguf(path, digest)
    store_cached(checkpoint)
    return checkpoint


def read_gguf_header(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer (from the weight cache, else the file's metadata), without
    reading its tensors."""
    cached = load_cached_header(file_digest(Path(path)))
    if cached is not None:
        return cached
    _, config, metadata = _open(Path(path))
    return config, Tokenizer.from_gguf_metadata(metadata)


def read_gguf(path: Path, digest: str) -> Checkpoint:
    """Parse and dequantize the GGUF file at `path` (no cache)."""
    reader, config, metadata = _open(path)
    permuted = GGUF_ARCHITECTURES[config.architecture]
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, str(path))
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(f"{path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from error
        # weight: [rows, cols], as ggml lists its dimensions innermost first
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if permuted and ".self_attn.q_proj." in name:
            values = unpermute_rows(values, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            values = unpermute_rows(values, config.num_kv_heads)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is memory-mapped
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    return Checkpoint(config, check_tensors(config, tensors, str(path)), tokenizer, digest)


def _open(path: Path) -> tuple[GGUFReader, ModelConfig, dict]:
    try:
        reader = GGUFReader(path)  # memory-maps the file: tensors are read when touched
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    names = {tensor.name for tensor in reader.tensors}
    config = gguf_config(metadata, tie_word_embeddings="output.weight" not in names, source=str(path))
    return reader, config, metadata


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert script, which reorders each head's q/k rows from Hugging Face's
    rotate-half layout (first half, second half) to interleaved pairs. weight: [heads * head_dim, ...]."""
    half = weight.shape[0] // heads // 2
    # [heads, half, 2, ...] -> [heads, 2, half, ...]
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str, source: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"{source}: unsupported tensor {gguf_name!r} (not a plain Llama-family decoder)")


def gguf_config(metadata: dict, tie_word_embeddings: bool, source: str) -> ModelConfig:
    """The ModelConfig described by llama.cpp's `{architecture}.*` metadata keys."""
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: unsupported GGUF architecture {architecture!r}; supported: {sorted(GGUF_ARCHITECTURES)}")

    def key(name: str, default=None):
        value = metadata.get(f"{architecture}.{name}", default)
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {architecture}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    scaling = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{source}: unsupported rope scaling {scaling!r}; supported: ['none', 'linear']")
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{source}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    rope_type, rope_params = "default", ()
    if scaling == "linear":
        rope_type, rope_params = "linear", (("factor", float(key("rope.scaling.factor"))),)
    return ModelConfig(
        vocab_size=int(metadata.get(f"{architecture}.vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=tie_word_embeddings,
        architecture=architecture,
        rope_type=rope_type,
        rope_params=rope_params,
    )
