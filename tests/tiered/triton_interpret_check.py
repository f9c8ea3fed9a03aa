"""Run the Triton kernels through Triton's interpreter and compare them with the reference.

Started by test_codecs_kernels.py as `python -m tests.tiered.triton_interpret_check` with
TRITON_INTERPRET=1 in the environment (Triton reads it when the kernels are defined, so it must be
set before tiered.codecs is imported). Prints one line per case; exits 1 on any difference.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from tiered.codecs import reference, triton_kernels
from tiered.codecs.layout import QuantFormat

CASES = [  # kind, bits, group, dtype, shape: every code width, every dtype, partial blocks, ragged groups
    ("int", 8, 64, torch.float16, (2, 16, 8)),
    ("int", 4, 64, torch.bfloat16, (2, 9, 16)),
    ("int", 2, 32, torch.float32, (1, 5, 12)),
    ("fp8", 8, 64, torch.float16, (2, 9, 16)),
    ("fp8", 8, 64, torch.bfloat16, (1, 3, 8)),
    ("int", 4, 6, torch.float16, (1, 20, 12)),
    ("int", 4, 64, torch.float16, (3, 64, 64)),
]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running this check")
        return 2
    warnings.filterwarnings("ignore")  # numpy warns about masked-off lanes (0 * inf)
    generator = torch.Generator().manual_seed(0)
    failures = 0
    for kind, bits, group, dtype, shape in CASES:
        fmt = QuantFormat(kind, bits, group)
        # keys: [kv_heads, tokens, head_dim] with one channel 30x larger; two blocks per batch
        keys = [(torch.randn(shape, generator=generator) * torch.linspace(1, 30, shape[2])).to(dtype) for _ in range(2)]
        values = [torch.randn(shape, generator=generator).to(dtype) for _ in range(2)]
        nbytes = fmt.layout(*shape).nbytes
        expected = [torch.zeros(nbytes, dtype=torch.uint8) for _ in keys]
        got = [torch.full((nbytes,), 0x5A, dtype=torch.uint8) for _ in keys]
        reference.encode(fmt, keys, values, expected)
        triton_kernels.encode(fmt, keys, values, got)
        decoded = [[torch.empty(shape, dtype=dtype) for _ in keys] for _ in range(4)]
        reference.decode(fmt, expected, decoded[0], decoded[1])
        triton_kernels.decode(fmt, expected, decoded[2], decoded[3])
        same_bytes = all(torch.equal(a, b) for a, b in zip(expected, got))
        same_values = all(torch.equal(a, b) for a, b in zip(decoded[0] + decoded[1], decoded[2] + decoded[3]))
        failures += not (same_bytes and same_values)
        name = f"int{bits}" if kind == "int" else kind
        print(f"{name} g{group} {dtype} {shape}: bytes {'equal' if same_bytes else 'DIFFER'}, "
              f"decoded {'equal' if same_values else 'DIFFER'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
