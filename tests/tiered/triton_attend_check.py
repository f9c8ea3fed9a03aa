"""Run the Triton attention over quantized blocks through Triton's interpreter and compare it with
the torch reference (attend_reference.py).

Started by test_attend_quantized.py as `python -m tests.tiered.triton_attend_check` with
TRITON_INTERPRET=1 in the environment (set before tiered.codecs is imported, as for
triton_interpret_check.py). Prints one line per case; exits 1 on any difference beyond tolerance.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from tiered.codecs import attend_reference, triton_kernels
from tiered.codecs.layout import QuantFormat

from .attend_cases import CASES, make_case


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running this check")
        return 2
    warnings.filterwarnings("ignore")  # numpy warns about masked-off lanes
    failures = 0
    for case in CASES:
        fmt = QuantFormat("int", case.bits, case.group)
        q, payloads, q_positions = make_case(case)
        scale = case.head_dim**-0.5
        expected = attend_reference.attend_quantized(fmt, q, payloads, case.tokens, case.starts, case.kv_heads,
                                                     q_positions, scale)
        got = triton_kernels.attend(fmt, q, payloads, list(case.tokens), list(case.starts), case.kv_heads,
                                    q_positions, scale)
        close = all(torch.allclose(g, e, atol=1e-4, rtol=1e-4) or torch.equal(g, e) for g, e in zip(got, expected))
        failures += not close
        print(f"{case.name}: {'close' if close else 'DIFFER'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
