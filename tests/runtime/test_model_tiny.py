"""Tiny random Llama, Qwen2 and Mistral checkpoints: our decoder against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime import load_model
from runtime.model import DenseKV

from .tiny_models import TINY_MODELS, VOCAB, write_gguf, write_hf_dir

TOLERANCE = 1e-4
TOKENS = 40


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(seed))  # [TOKENS] int64


def transformers_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()  # [tokens, vocab]


def check_against(ours, expected: torch.Tensor, ids: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    """Prefill, chunked prefill and token-by-token decode through DenseKV all give `expected`."""
    logits = ours.forward(ids, torch.arange(len(ids)), DenseKV.for_model(ours))
    assert logits.shape == (len(ids), VOCAB) and logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= tolerance
    kv = DenseKV.for_model(ours, capacity_tokens=4)
    chunked = torch.cat([ours.forward(ids[s:s + 7], torch.arange(s, min(s + 7, len(ids))), kv) for s in range(0, len(ids), 7)])
    assert (chunked - expected).abs().max().item() <= tolerance
    kv = DenseKV.for_model(ours)
    stepped = torch.cat([ours.forward(ids[i:i + 1], torch.tensor([i]), kv) for i in range(len(ids))])
    assert (stepped - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_safetensors_dir_matches_transformers(tmp_path, name):
    reference = write_hf_dir(tmp_path, name)
    ours = load_model(tmp_path)
    assert ours.config.architecture == reference.config.model_type
    ids = prompt()
    expected = transformers_logits(reference, ids)
    assert expected.abs().max().item() > 1.0  # weights large enough for a wrong layout to show
    check_against(ours, expected, ids)


def test_gguf_matches_transformers_loading_the_same_file(tmp_path, monkeypatch):
    """A llama.cpp-style file (q/k rows permuted; Q4_0, Q4_1, Q8_0, F16 and F32 tensors) read by us and
    by transformers' own GGUF loader gives the same logits."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf")
    ours = load_model(path)
    assert ours.config.tie_word_embeddings and ours.config.num_kv_heads == 2
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = prompt(1)
    check_against(ours, transformers_logits(reference, ids), ids)


def test_gguf_tokenizer_and_template(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokenizer = load_model(write_gguf(tmp_path / "tiny.gguf")).tokenizer
    text = "ROMEO: 1234 tokens, said he.\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat[0] == 1 and chat.count(2) == 1 and tokenizer.eos_token_id == 2  # <|im_start|> ... <|im_end|>
    assert tokenizer.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_dir_tokenizer(tmp_path):
    write_hf_dir(tmp_path, "llama")
    tokenizer = load_model(tmp_path).tokenizer
    assert tokenizer.eos_token_id == 2
    assert tokenizer.decode(tokenizer.encode("But, soft! what light")) == "But, soft! what light"
    assert tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)) \
        == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_transformers(tmp_path, dtype):
    reference = write_hf_dir(tmp_path, "qwen2").to(dtype)
    ours = load_model(tmp_path, dtype=dtype)
    assert ours.dtype == dtype and ours.embedding.dtype == dtype
    ids = prompt(2)
    expected = transformers_logits(reference, ids)
    logits = ours.forward(ids, torch.arange(len(ids)), DenseKV.for_model(ours))
    assert logits.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= 0.05 * scale
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_fingerprint_names_weights_and_dtype(tmp_path):
    write_hf_dir(tmp_path / "a", "llama", seed=0)
    write_hf_dir(tmp_path / "b", "llama", seed=1)
    a, a_again, b = load_model(tmp_path / "a"), load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a.fingerprint == a_again.fingerprint
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint != load_model(tmp_path / "a", dtype=torch.bfloat16).fingerprint
