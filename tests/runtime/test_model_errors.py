"""Bad names, files, configs and inputs raise clear errors, and leave the KV cache untouched."""

from __future__ import annotations

import json

import pytest
import torch

from runtime import load_model
from runtime.model import MODELS, DenseKV

from .tiny_models import VOCAB, write_hf_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Mistral whose 48-token sliding window caps its context at 48 tokens."""
    directory = tmp_path_factory.mktemp("mistral")
    write_hf_dir(directory, "mistral")
    return load_model(directory)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt-17'") as error:
        load_model("gpt-17")
    for name in MODELS:
        assert name in str(error.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)  # a directory, but not a model
    write_hf_dir(tmp_path, "llama")
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model(tmp_path)


def test_files_that_are_not_models(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        load_model(text)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_model(garbage)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}, "unsupported rope scaling 'yarn'"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
])
def test_unsupported_configs(tmp_path, change, message):
    write_hf_dir(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_tensors_that_do_not_fit_the_config(tmp_path):
    write_hf_dir(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight has shape \(64, 128\), expected \(64, 96\)"):
        load_model(tmp_path)


def test_bad_dtype_and_name_types(tmp_path):
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_model("smollm2-135m", dtype=torch.int8)
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(135)
    with pytest.raises(ValueError, match="device must name a torch device"):
        load_model("smollm2-135m", device="abacus")


def test_token_ids_outside_the_vocabulary(tiny):
    kv = DenseKV.for_model(tiny)
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=rf"token ids must be in \[0, {VOCAB}\), got {bad}"):
            tiny.forward(torch.tensor([5, bad, 7]), torch.arange(3), kv)
    assert kv.length_tokens(0) == 0  # nothing was appended


def test_context_beyond_the_maximum(tiny):
    assert tiny.config.max_position_embeddings == 48
    kv = DenseKV.for_model(tiny)
    tiny.forward(torch.zeros(47, dtype=torch.int64), torch.arange(47), kv)
    tiny.forward(torch.zeros(1, dtype=torch.int64), torch.tensor([47]), kv)  # the 48th token fits
    with pytest.raises(ValueError, match="49 tokens exceeds this model's maximum of 48"):
        tiny.forward(torch.zeros(1, dtype=torch.int64), torch.tensor([48]), kv)
    with pytest.raises(ValueError, match="maximum of 48"):
        tiny.forward(torch.zeros(10, dtype=torch.int64), torch.arange(40, 50), DenseKV.for_model(tiny))
    assert kv.length_tokens(0) == kv.length_tokens(1) == 48


def test_real_model_names_its_limit(smollm2):
    with pytest.raises(ValueError, match="maximum of 8192"):
        smollm2.forward(torch.tensor([1]), torch.tensor([8192]), DenseKV.for_model(smollm2))


def test_wrong_input_types_and_shapes(tiny):
    kv = DenseKV.for_model(tiny)
    ids, positions = torch.arange(4), torch.arange(4)
    with pytest.raises(TypeError, match="token_ids must be a torch.Tensor"):
        tiny.forward([1, 2, 3, 4], positions, kv)
    with pytest.raises(TypeError, match="token_ids must be int64"):
        tiny.forward(ids.int(), positions, kv)
    with pytest.raises(TypeError, match="positions must be int64"):
        tiny.forward(ids, positions.float(), kv)
    with pytest.raises(ValueError, match=r"token_ids must have shape \[n\]"):
        tiny.forward(ids[None], positions, kv)
    with pytest.raises(ValueError, match="n >= 1"):
        tiny.forward(ids[:0], positions[:0], kv)
    with pytest.raises(ValueError, match="same shape"):
        tiny.forward(ids, positions[:3], kv)
    with pytest.raises(ValueError, match="consecutive"):
        tiny.forward(ids, torch.tensor([0, 1, 3, 4]), kv)
    with pytest.raises(ValueError, match=">= 0"):
        tiny.forward(ids, positions - 1, kv)
    with pytest.raises(TypeError, match="AttentionBackend"):
        tiny.forward(ids, positions, None)
    with pytest.raises(ValueError, match="continue layer 0's sequence at 0"):
        tiny.forward(ids, positions + 2, kv)  # a gap: the backend refuses
    assert kv.length_tokens(0) == 0
