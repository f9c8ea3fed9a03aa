"""Linear layers over weights prepacked for oneDNN (runtime.model.packed): the same results as
F.linear for every row count, on the weights it packs, and F.linear itself where it does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.model.packed import PACKING, Linear


def test_the_pinned_torch_build_has_the_onednn_linear_ops():
    assert PACKING  # torch 2.13.0's CPU wheel: the path bench_packed.py measures is the one tests run


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17, 64])
def test_packed_results_equal_f_linear_to_float_rounding(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)  # [out, in]
    b = torch.randn(96, generator=generator) if bias else None
    x = torch.randn(rows, 40, generator=generator)  # [rows, in]
    linear = Linear(weight, b)
    assert linear.packed is not None
    torch.testing.assert_close(linear(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_a_non_contiguous_input_gives_the_same_result():
    weight = torch.randn(32, 24)
    x = torch.randn(12, 48)[:, ::2]  # [12, 24], not contiguous
    torch.testing.assert_close(Linear(weight)(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_not_packed(dtype):
    weight = torch.randn(16, 8).to(dtype)
    linear = Linear(weight)
    assert linear.packed is None
    x = torch.randn(4, 8).to(dtype)
    assert torch.equal(linear(x), F.linear(x, weight))


def test_one_row_takes_f_linear_and_more_take_the_packed_copy():
    weight = torch.randn(64, 32)
    linear = Linear(weight)
    for rows in (1, 5):
        x = torch.randn(rows, 32)
        expected = linear.unpacked(x) if rows == 1 else linear.over_packed(x)
        assert torch.equal(linear(x), expected)
    one = torch.randn(1, 32)
    torch.testing.assert_close(linear.over_packed(one), linear.unpacked(one), rtol=1e-5, atol=1e-5)
