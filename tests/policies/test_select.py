"""select_blocks: sinks, then the recent window, then the top-k by score, within the budget."""

from __future__ import annotations

import pytest
import torch

from policies import select_blocks
from policies.importance import select_unprotected


def test_sinks_window_then_best_scores():
    scores = torch.tensor([0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 0.5, 0.1])
    keep = select_blocks(scores, budget_blocks=5, sink_blocks=1, window_blocks=2)
    assert keep.tolist() == [0, 7, 6, 1, 3]
    assert select_unprotected(scores, budget_blocks=5, sink_blocks=1, window_blocks=2) == (1, 3)


def test_ties_prefer_the_newer_block_and_order_is_stable():
    scores = torch.ones(10)
    assert select_blocks(scores, budget_blocks=4, sink_blocks=1, window_blocks=1).tolist() == [0, 9, 8, 7]
    assert select_blocks(scores, budget_blocks=4, sink_blocks=1, window_blocks=1).tolist() == [0, 9, 8, 7]


def test_budgets_below_the_protected_blocks_and_above_everything():
    scores = torch.arange(6.0)
    assert select_blocks(scores, budget_blocks=2, sink_blocks=2, window_blocks=3).tolist() == [0, 1]
    assert select_blocks(scores, budget_blocks=3, sink_blocks=2, window_blocks=3).tolist() == [0, 1, 5]
    assert sorted(select_blocks(scores, budget_blocks=60, sink_blocks=1, window_blocks=1).tolist()) == list(range(6))
    assert select_blocks(scores, budget_blocks=0).tolist() == []
    assert select_blocks(torch.zeros(2), budget_blocks=3, sink_blocks=4, window_blocks=4).tolist() == [0, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="NaN"):
        select_blocks(torch.tensor([1.0, float("nan")]), budget_blocks=1)
    with pytest.raises(ValueError, match=r"\[blocks\]"):
        select_blocks(torch.ones(2, 3), budget_blocks=1)
    with pytest.raises(ValueError, match="budget_blocks must be >= 0"):
        select_blocks(torch.ones(3), budget_blocks=-1)
    with pytest.raises(TypeError, match="window_blocks must be int"):
        select_blocks(torch.ones(3), budget_blocks=1, window_blocks=1.0)
