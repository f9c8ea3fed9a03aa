"""Traces of attention and their replay: the format, a synthetic generator, and the replay harness."""

from .format import FORMAT, VERSION, Trace, attention_logits, mass_from_vectors
from .synthetic import SyntheticConfig, rope, synthetic_trace

__all__ = [
    "FORMAT",
    "VERSION",
    "SyntheticConfig",
    "Trace",
    "attention_logits",
    "mass_from_vectors",
    "rope",
    "synthetic_trace",
]
