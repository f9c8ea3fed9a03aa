"""Tiny real checkpoints for the model tests: a byte-level BPE tokenizer trained on Shakespeare, random
Llama/Qwen2/Mistral models saved by transformers as safetensors directories, and GGUF files written
the way llama.cpp's converter writes them (q/k rows permuted, tensors quantized)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=2,
            pad_token_id=None)

# name -> (config class, model class, config overrides)
TINY_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-biases": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, tie_word_embeddings=False)),
    "llama-rope-llama3": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-rope-linear": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=48, tie_word_embeddings=False)),
}


def shakespeare(chars: int | None = None) -> str:
    """The document shipped with the runtime (runtime/data/tinyshakespeare.txt)."""
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return text if chars is None else text[:chars]


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer of exactly VOCAB tokens, the first three special."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([shakespeare(60_000)], trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    return tokenizer


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model of kind `name` with weights large enough that mistakes show in the logits."""
    config_class, model_class, overrides = TINY_MODELS[name]
    config = config_class(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return model.to(dtype)


def write_hf_dir(directory: Path, name: str, seed: int = 0) -> LlamaForCausalLM:
    """Save a random model of kind `name` and a trained tokenizer into `directory`; returns the model."""
    model = random_model(name, seed)
    model.save_pretrained(directory)
    train_tokenizer().save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return model


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: rotate-half pairs -> interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# GGUF tensor name suffix -> (transformers name suffix, ggml type it is stored in)
_Q = gguf.GGMLQuantizationType
_GGUF_LAYER_TENSORS = {
    "attn_norm.weight": ("input_layernorm.weight", _Q.F32),
    "ffn_norm.weight": ("post_attention_layernorm.weight", _Q.F32),
    "attn_q.weight": ("self_attn.q_proj.weight", _Q.Q4_0),
    "attn_k.weight": ("self_attn.k_proj.weight", _Q.Q4_1),
    "attn_v.weight": ("self_attn.v_proj.weight", _Q.Q8_0),
    "attn_output.weight": ("self_attn.o_proj.weight", _Q.F16),
    "ffn_gate.weight": ("mlp.gate_proj.weight", _Q.Q4_1),
    "ffn_up.weight": ("mlp.up_proj.weight", _Q.Q8_0),
    "ffn_down.weight": ("mlp.down_proj.weight", _Q.Q4_0),
}


def write_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama GGUF as llama.cpp writes one: metadata, tokenizer, permuted q/k, mixed quantization
    (Q4_0, Q4_1, Q8_0, F16, F32), tied embeddings. Returns `path`."""
    model = random_model("llama-tied", seed)
    config, state = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    tokenizer = train_tokenizer()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(VOCAB)
    vocab = tokenizer.get_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([3 if i < len(SPECIAL_TOKENS) else 1 for i in range(VOCAB)])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def add(name: str, array: np.ndarray, qtype) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype == _Q.F32:
            writer.add_tensor(name, array)
        elif qtype == _Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"], _Q.Q8_0)
    add("output_norm.weight", state["model.norm.weight"], _Q.F32)
    for layer in range(config.num_hidden_layers):
        for gguf_suffix, (hf_suffix, qtype) in _GGUF_LAYER_TENSORS.items():
            array = state[f"model.layers.{layer}.{hf_suffix}"]
            if gguf_suffix == "attn_q.weight":
                array = llama_cpp_permute(array, config.num_attention_heads)
            elif gguf_suffix == "attn_k.weight":
                array = llama_cpp_permute(array, config.num_key_value_heads)
            add(f"blk.{layer}.{gguf_suffix}", array, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
