"""The dequantized-weight cache: the second load reads it instead of the GGUF file; a damaged entry is a miss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime import load_model
from runtime.model import DenseKV, gguf_loader
from runtime.model.cache import cache_dir, entry_path
from runtime.model.gguf_loader import file_digest

from .tiny_models import write_gguf


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return write_gguf(tmp_path / "tiny.gguf")


def logits_of(model) -> torch.Tensor:
    ids = torch.arange(0, 300, 10)  # [30]
    return model.forward(ids, torch.arange(len(ids)), DenseKV.for_model(model))


def forbid_dequantizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again instead of read from the cache")
    monkeypatch.setattr(gguf_loader, "read_gguf", refuse)


def test_second_load_reads_the_cache(gguf_file, tmp_path, monkeypatch):
    first = load_model(gguf_file)
    entry = entry_path(file_digest(gguf_file))
    assert cache_dir() == tmp_path / "cache" / "tiered" and entry.is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary file left behind
    forbid_dequantizing(monkeypatch)
    second = load_model(gguf_file)
    assert second.fingerprint == first.fingerprint
    assert second.tokenizer.encode("Good morrow, cousin.") == first.tokenizer.encode("Good morrow, cousin.")
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert torch.equal(logits_of(second), logits_of(first))


def test_corrupt_entry_is_a_miss(gguf_file):
    expected = logits_of(load_model(gguf_file))
    entry = entry_path(file_digest(gguf_file))
    data = bytearray(entry.read_bytes())
    data[-1000] ^= 0xFF  # one flipped byte in the tensor payload
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="ignoring unreadable weight cache entry"):
        model = load_model(gguf_file)
    assert torch.equal(logits_of(model), expected)
    entry.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="ignoring unreadable weight cache entry"):
        assert torch.equal(logits_of(load_model(gguf_file)), expected)


def test_cache_keyed_by_file_contents(gguf_file, tmp_path):
    other = write_gguf(tmp_path / "other.gguf", seed=1)
    a, b = load_model(gguf_file), load_model(other)
    assert a.fingerprint != b.fingerprint
    assert not torch.equal(logits_of(a), logits_of(b))
    assert len(list(entry_path("x").parent.glob("*.safetensors"))) == 2


def test_unwritable_cache_still_loads(gguf_file, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="could not write the weight cache"):
        model = load_model(gguf_file)
    assert logits_of(model).shape == (30, 512)


def test_load_header_reads_no_weights_and_matches_the_model(gguf_file, tmp_path, monkeypatch):
    from runtime.model import load_header

    from .tiny_models import write_hf_dir

    text = "Good morrow, cousin.<|im_end|>"
    config, tokenizer = load_header(gguf_file)  # no cache entry yet: from the file's metadata
    assert not entry_path(file_digest(gguf_file)).exists()  # and nothing was dequantized for it
    model = load_model(gguf_file)
    assert config == dataclasses.replace(model.config, fingerprint="")  # the weights' digest is not read
    assert tokenizer.encode(text) == model.tokenizer.encode(text)
    forbid_dequantizing(monkeypatch)
    monkeypatch.setattr(gguf_loader, "_open", lambda path: (_ for _ in ()).throw(AssertionError("file parsed")))
    cached_config, cached_tokenizer = load_header(gguf_file)  # from the cache entry's metadata
    assert cached_config == config and cached_tokenizer.encode(text) == tokenizer.encode(text)
    directory = tmp_path / "hf"
    write_hf_dir(directory, "llama", seed=1)
    hf_config, hf_tokenizer = load_header(directory)
    assert hf_config == dataclasses.replace(load_model(directory).config, fingerprint="")
    assert hf_tokenizer.encode(text) == load_model(directory).tokenizer.encode(text)
