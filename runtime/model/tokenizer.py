"""Text <-> token ids, built from a GGUF file's vocabulary and merges or from a `tokenizer.json`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

# GGUF `tokenizer.ggml.pre` -> how text is split before byte-level BPE, as llama.cpp splits it.
# GPT-2's split is ByteLevel's own regex; the StarCoder family (SmolLM) first cuts digits apart.
_GPT2 = "gpt2"
_DIGITS_THEN_GPT2 = "digits+gpt2"
GGUF_PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types that are matched whole in text


class Tokenizer:
    """A `tokenizers` tokenizer plus what a chat needs: the end-of-sequence id and the chat template.

    `encode` parses special tokens written in the text (`<|im_end|>` becomes one id) and adds the
    beginning-of-sequence token when the model asks for one, as Hugging Face's tokenizers do."""

    def __init__(self, backend: BackendTokenizer, eos_token_id: int | None, bos_token_id: int | None = None,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; ids outside the vocabulary raise ValueError."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:3]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "..."}, ...]) under the model's template."""
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; use encode() on plain text")
        if isinstance(messages, (str, bytes)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise TypeError("messages must be a list of {'role': str, 'content': str} dicts")
        template = _environment().from_string(self.chat_template)
        special = {name: self._token(token_id) for name, token_id in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))}
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the prompt for `messages`, ending with the assistant's turn opener when asked."""
        return self.backend.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    # Serialized form, for the weight cache: the backend's JSON plus the fields above.
    def to_json(self) -> str:
        return json.dumps({"backend": self.backend.to_str(), "eos_token_id": self.eos_token_id,
                           "bos_token_id": self.bos_token_id, "chat_template": self.chat_template})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        state = json.loads(text)
        return cls(BackendTokenizer.from_str(state["backend"]), state["eos_token_id"], state["bos_token_id"], state["chat_template"])

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """A byte-level BPE tokenizer from llama.cpp's `tokenizer.*` metadata keys."""
        model = metadata.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in metadata or "tokenizer.ggml.merges" not in metadata:
            raise ValueError("the GGUF file carries no tokenizer (tokenizer.ggml.tokens and .merges)")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}; supported: ['gpt2'] (byte-level BPE)")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(GGUF_PRE_TOKENIZERS)}")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
        backend = BackendTokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if GGUF_PRE_TOKENIZERS[pre] == _DIGITS_THEN_GPT2:
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        token_types = list(metadata.get("tokenizer.ggml.token_type", []))
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, kind in enumerate(token_types) if kind == GGUF_CONTROL])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, kind in enumerate(token_types) if kind == GGUF_USER_DEFINED])
        bos = _optional_int(metadata.get("tokenizer.ggml.bos_token_id"))
        if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
        eos = _optional_int(metadata.get("tokenizer.ggml.eos_token_id"))
        return cls(backend, eos, bos, metadata.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, directory: Path, hf_config: dict) -> Tokenizer:
        """The tokenizer of a Hugging Face checkpoint directory (`tokenizer.json`, `tokenizer_config.json`)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json (a Hugging Face fast tokenizer is required)")
        backend = BackendTokenizer.from_file(str(path))
        settings_path = Path(directory) / "tokenizer_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        template = settings.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_path = Path(directory) / "chat_template.jinja"
        if template is None and template_path.is_file():
            template = template_path.read_text()

        def token_id(name: str) -> int | None:
            token = settings.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            found = backend.token_to_id(token) if isinstance(token, str) else None
            fallback = hf_config.get(f"{name}_id")
            fallback = fallback[0] if isinstance(fallback, list) and fallback else fallback
            return found if found is not None else _optional_int(fallback)

        return cls(backend, token_id("eos_token"), token_id("bos_token"), template)


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _raise(message: str):
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = _raise
    return environment
