"""Linear layers whose weights are also kept prepacked for oneDNN, for steps of several rows on a CPU.

A batched decode step multiplies each weight by one row per sequence. On this project's CPU (AMD
EPYC, AVX2, one core per benchmark) F.linear of float32 weights goes through MKL, and a step's
multiplications over 8 rows took 2.8× one row's time over SmolLM2-135M's matrices, though the
weights are read once either way. oneDNN over weights reordered once, at load, took 0.65× MKL's
time at 8 rows and 0.88× at 512 (a prefill chunk), but 1.18× at one row
(benchmarks/bench_packed.py). So a single row keeps F.linear and more rows take the packed copy.
The packed copy doubles the weights' memory; only CPU float32 weights get one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PACK_ROWS = 8  # the row count oneDNN's reorder is tuned for (a batch of 8 decodes; as good at 512)


def _packing_works() -> bool:
    """Whether this torch build has the oneDNN linear ops (internal to torch, used by its compiler)."""
    try:
        weight = torch.ones(4, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(out, torch.full((2, 4), 3.0))


PACKING = torch.backends.mkldnn.is_available() and _packing_works()


class Linear:
    """y = x @ weight.T + bias, x: [rows, in], weight: [out, in]; more than one row of a CPU
    float32 weight runs on the prepacked copy. Results agree with F.linear's to float rounding
    (the order of the sums differs), as F.linear's own do between one row and several."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        packs = PACKING and weight.device.type == "cpu" and weight.dtype == torch.float32
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if packs else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None or x.shape[0] < 2:
            return self.unpacked(x)
        return self.over_packed(x)

    def unpacked(self, x: Tensor) -> Tensor:
        """F.linear over the weight as loaded."""
        return F.linear(x, self.weight, self.bias)

    def over_packed(self, x: Tensor) -> Tensor:
        """The product over the prepacked copy (there must be one), whatever the row count."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
