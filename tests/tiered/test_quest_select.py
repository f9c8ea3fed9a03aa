"""The C kernels a sparse step runs on the CPU: Quest's scores and each head's pages in one call
(cpu_kernels.quest_select), the check of a step's pages (page_blocks) and their rows in the device
pool (page_rows), each equal to the torch code it stands in for."""

from __future__ import annotations

import pytest
import torch

from policies.importance import Quest, select_per_head
from tiered.codecs import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no C compiler: {cpu_kernels.build_error()}")


def bounds(pages: int, kv_heads: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key_min, key_max: [pages, kv_heads, head_dim] fp32, min <= max."""
    generator = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(pages, kv_heads, dim, generator=generator) for _ in range(2))
    return torch.minimum(a, b), torch.maximum(a, b)


@pytest.mark.parametrize(
    ("pages", "kv_heads", "group", "dim", "budget", "sinks", "window"),
    [
        (5, 2, 3, 64, 3, 1, 1),  # fewer pages than the kernel's stride of 8
        (8, 1, 1, 16, 4, 1, 2),
        (37, 3, 3, 64, 9, 1, 2),  # not a multiple of 8; GQA
        (64, 2, 4, 32, 8, 2, 3),
        (20, 2, 2, 64, 2, 1, 3),  # budget below sinks + window: the protected pages are cut
        (6, 2, 1, 64, 10, 1, 1),  # budget above the pages: all are kept
    ],
)
def test_scores_and_choice_equal_quest_and_select_per_head(pages, kv_heads, group, dim, budget, sinks, window):
    key_min, key_max = bounds(pages, kv_heads, dim, seed=pages)
    query = torch.randn(kv_heads * group, dim, generator=torch.Generator().manual_seed(1)) * 2
    scores, keep = cpu_kernels.quest_select(query, key_min, key_max, budget_pages=budget, sink_pages=sinks,
                                            window_pages=window)
    assert torch.allclose(scores, Quest().score(query, key_min, key_max), rtol=1e-5, atol=1e-5)
    expected = select_per_head(scores, budget_blocks=budget, sink_blocks=sinks, window_blocks=window)
    assert keep.dtype == torch.int64 and torch.equal(keep, expected)


def test_equal_scores_keep_the_older_page():
    """Every page bounded alike: past the sink and the window, the oldest pages are kept."""
    key_min, key_max = torch.zeros(12, 1, 16), torch.ones(12, 1, 16)
    _, keep = cpu_kernels.quest_select(torch.ones(2, 16), key_min, key_max, budget_pages=5, sink_pages=1,
                                       window_pages=1)
    assert keep.tolist() == [[0, 1, 2, 3, 11]]


def test_nan_and_bad_arguments_are_refused():
    key_min, key_max = bounds(9, 2, 16, seed=0)
    query = torch.randn(4, 16)
    key_max[3, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cpu_kernels.quest_select(query, key_min, key_max, budget_pages=4, sink_pages=1, window_pages=1)
    key_min, key_max = bounds(9, 2, 16, seed=0)
    for args, match in [
        ((torch.randn(4, 8), key_min, key_max), "head_dim"),
        ((torch.randn(3, 16), key_min, key_max), "multiple"),
        ((query.double(), key_min, key_max), "fp32"),
        ((query, key_min, key_max[:, :1]), "key_min, key_max"),
        ((query, key_min[:, :, :8], key_max[:, :, :8]), "key_min, key_max"),
    ]:
        with pytest.raises(ValueError, match=match):
            cpu_kernels.quest_select(*args, budget_pages=4, sink_pages=1, window_pages=1)
    for budget, sinks in [(0, 1), (4, -1), (4.0, 1), (True, 1)]:
        with pytest.raises(ValueError, match="budget_pages"):
            cpu_kernels.quest_select(query, key_min, key_max, budget_pages=budget, sink_pages=sinks, window_pages=1)


@pytest.mark.parametrize("partial", [False, True])
def test_page_blocks_are_the_unique_blocks_of_the_pages(partial):
    pages = torch.tensor([[0, 5, 6, 13], [2, 3, 12, 13]])
    assert cpu_kernels.page_blocks(pages, held=14, per_block=4, partial=partial) == [0, 1, 3]
    assert cpu_kernels.page_blocks(pages, held=14, per_block=1, partial=partial) == torch.unique(pages).tolist()


def test_page_blocks_refuse_pages_out_of_range_and_a_partial_page_not_last():
    with pytest.raises(ValueError, match=r"0\.\.13"):
        cpu_kernels.page_blocks(torch.tensor([[0, 14]]), held=14, per_block=4, partial=False)
    with pytest.raises(ValueError, match=r"0\.\.13"):
        cpu_kernels.page_blocks(torch.tensor([[-1, 13]]), held=14, per_block=4, partial=False)
    with pytest.raises(ValueError, match="partial newest page"):
        cpu_kernels.page_blocks(torch.tensor([[0, 13], [13, 2]]), held=14, per_block=4, partial=True)
    assert cpu_kernels.page_blocks(torch.tensor([[13, 2]]), held=14, per_block=4, partial=False) == [0, 3]


def test_page_rows_equal_the_rows_computed_in_torch():
    pages = torch.tensor([[0, 5, 6, 13], [2, 3, 12, 13], [1, 7, 8, 13]])  # [kv_heads, kept]
    slots = torch.tensor([6, 2, 9, 0])  # the device slot of each block
    per_block, page_tokens, block_tokens, head_rows, short_by = 4, 8, 32, 10 * 32, 3
    first, count = cpu_kernels.page_rows(pages, slots, per_block, page_tokens, block_tokens, head_rows, short_by)
    heads = torch.arange(pages.shape[0])[:, None] * head_rows  # [kv_heads, 1]
    want = heads + slots[pages // per_block] * block_tokens + pages % per_block * page_tokens
    want_count = torch.full_like(pages, page_tokens)
    want_count[:, -1] -= short_by
    assert torch.equal(first, want) and torch.equal(count, want_count)
