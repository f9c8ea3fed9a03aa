"""What a loader hands the model: config, tensors under Hugging Face names, tokenizer, digest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .tokenizer import Tokenizer

# Buffers some checkpoints carry that the decoder recomputes; other unknown names are rejected.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    """Weights of a Llama-family decoder under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`),
    in the checkpoint's own float dtype, with q/k rows in Hugging Face's rotary layout. `digest` is a
    hash of the source files: the weight cache's key and a part of the model's fingerprint."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    digest: str


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def required_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the decoder needs."""
    hidden, heads_dim = config.hidden_size, config.num_heads * config.head_dim
    kv_dim, inner = config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = layer_prefix(layer)
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads_dim),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
        })
    return shapes


def optional_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the biases a decoder may have (Qwen2's q/k/v, Llama's attention_bias)."""
    heads_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    sizes = {"self_attn.q_proj.bias": heads_dim, "self_attn.k_proj.bias": kv_dim,
             "self_attn.v_proj.bias": kv_dim, "self_attn.o_proj.bias": config.hidden_size}
    return {layer_prefix(layer) + suffix: (size,) for layer in range(config.num_layers) for suffix, size in sizes.items()}


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The tensors the decoder uses, after checking names, shapes and dtypes against `config`.

    Raises ValueError naming the missing, unexpected or misshapen tensors of `source`."""
    required, optional = required_shapes(config), optional_shapes(config)
    missing = sorted(set(required) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    kept: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        shape = required.get(name) or optional.get(name)
        if shape is None:
            if not name.endswith(IGNORED_SUFFIXES) and not (name == "lm_head.weight" and config.tie_word_embeddings):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {name} has dtype {tensor.dtype}, expected a float dtype")
        kept[name] = tensor
    if unexpected:
        raise ValueError(f"{source}: unsupported tensors (not a plain Llama-family decoder?), e.g. {sorted(unexpected)[:3]}")
    return kept
