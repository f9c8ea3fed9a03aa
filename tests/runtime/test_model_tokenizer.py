"""The default model's tokenizer, built from its GGUF metadata, against transformers' from the same file."""

from __future__ import annotations

import pytest

from runtime.model.load import smollm2_135m

from .tiny_models import shakespeare

TEXTS = [
    "Hello world!",
    " leading space,  double  spaces\n\nnewlines\ttabs ",
    "naïve café — “quotes” 日本語 🙂",
    "In 2024, 3.14159 and 1,000,000 items",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x**2  # comment",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_135m()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS + [shakespeare(2000)])
def test_encode_matches_transformers_and_round_trips(smollm2, hf_tokenizer, text):
    ids = smollm2.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids) == text


def test_special_tokens(smollm2, hf_tokenizer):
    tokenizer = smollm2.tokenizer
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2  # <|im_end|> ends an assistant turn
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.decode([1, 2], skip_special_tokens=True) == ""
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152


def test_chat_template_matches_transformers(smollm2, hf_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    ids = smollm2.tokenizer.apply_chat_template(messages)
    assert ids == list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_bad_tokenizer_input(smollm2):
    with pytest.raises(TypeError, match="encode expects a str"):
        smollm2.tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\)"):
        smollm2.tokenizer.decode([5, 49152])
    with pytest.raises(TypeError, match="messages must be a list"):
        smollm2.tokenizer.apply_chat_template([{"role": "user"}])
