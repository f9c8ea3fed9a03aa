"""The model: a compact Llama-family decoder over an AttentionBackend, its loaders and tokenizer."""

from .backend import AttentionBackend
from .config import ModelConfig
from .dense import DenseKV
from .llama import Model, StepInput
from .load import MODELS, load_header, load_model
from .tokenizer import Tokenizer

__all__ = ["MODELS", "AttentionBackend", "DenseKV", "Model", "ModelConfig", "StepInput", "Tokenizer", "load_header", "load_model"]
