"""Replaying policies over the synthetic trace: what the issue promises, measured."""

from __future__ import annotations

import pytest

from policies import IMPORTANCE, PREFETCH
from policies.trace import SyntheticConfig, synthetic_trace
from policies.trace.replay import COLUMNS, ReplayConfig, replay, summarize

BUDGETS = (0.25,)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(SyntheticConfig())


@pytest.fixture(scope="module")
def rows(trace):
    return replay(trace, ReplayConfig(budgets=BUDGETS))


def test_every_policy_budget_and_prefetch_has_a_row(rows, trace):
    assert len(rows) == len(BUDGETS) * len(IMPORTANCE) * len(PREFETCH)
    assert {(r["importance"], r["budget"], r["prefetch"]) for r in rows} == {
        (i, b, p) for i in IMPORTANCE for b in BUDGETS for p in PREFETCH
    }
    for row in rows:
        assert tuple(row) == COLUMNS
        assert 0 <= row["mass_recall"] <= 1 + 1e-6 and 0 <= row["topk_recall"] <= 1 and 0 <= row["hit_rate"] <= 1
        assert row["bytes_moved"] == (row["demand_blocks"] + row["prefetched_blocks"]) * trace.block_nbytes()
        assert row["steps"] == trace.steps - trace.observe_steps


def test_oracle_recall_is_one_and_no_estimator_beats_it(rows):
    mass, topk = summarize(rows, "mass_recall"), summarize(rows, "topk_recall")
    for budget in BUDGETS:
        assert topk[("oracle", budget)] == 1.0
        assert all(mass[(name, budget)] <= mass[("oracle", budget)] + 1e-6 for name in IMPORTANCE)


def test_a_full_budget_keeps_all_the_attention(trace):
    full = replay(trace, ReplayConfig(budgets=(1.0,), prefetch=("none",)))
    assert all(row["mass_recall"] == pytest.approx(1.0, abs=1e-5) and row["topk_recall"] == 1.0 for row in full)
    assert all(row["hit_rate"] == 1.0 for row in full)  # every block stays up: nothing to miss


def test_quest_and_snapkv_beat_recency_at_a_quarter_budget(rows):
    mass = summarize(rows, "mass_recall")
    recency = mass[("recency", 0.25)]
    assert mass[("quest", 0.25)] > recency + 0.05
    assert mass[("snapkv", 0.25)] > recency + 0.02


@pytest.mark.parametrize("importance", ["quest", "oracle"])
def test_next_layer_prefetch_hits_more_than_none(rows, importance):
    hit = {r["prefetch"]: r["hit_rate"] for r in rows if r["importance"] == importance and r["budget"] == 0.25}
    demand = {r["prefetch"]: r["demand_blocks"] for r in rows if r["importance"] == importance and r["budget"] == 0.25}
    assert hit["next-layer"] > hit["none"] + 0.01
    assert demand["next-layer"] < demand["none"]


def test_no_prefetch_moves_only_what_misses(rows):
    for row in rows:
        if row["prefetch"] == "none":
            assert row["prefetched_blocks"] == 0


def test_replay_is_deterministic_and_feedback_is_a_choice():
    small = synthetic_trace(SyntheticConfig(layers=2, prompt_tokens=256, steps=10, observe_steps=2))
    config = ReplayConfig(importance=("h2o", "snapkv"), prefetch=("none", "topk"), budgets=(0.25,))
    assert replay(small, config) == replay(small, config)
    everything = replay(small, ReplayConfig(importance=("h2o",), prefetch=("none",), budgets=(0.25,), feedback="all"))
    kept = [r for r in replay(small, config) if r["importance"] == "h2o" and r["prefetch"] == "none"]
    assert everything[0]["mass_recall"] != kept[0]["mass_recall"]  # learning from all attention changes the choice


def test_progress_counts_every_layer_step():
    small = synthetic_trace(SyntheticConfig(layers=2, prompt_tokens=128, steps=4, observe_steps=1))
    seen = []
    replay(
        small,
        ReplayConfig(importance=("quest", "recency"), prefetch=("none",), budgets=(0.5, 1.0)),
        progress=seen.append,
    )
    assert sum(seen) == 2 * 2 * small.steps * small.layers


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="valid names"):
        ReplayConfig(importance=("quest", "magic"))
    with pytest.raises(ValueError, match="valid names"):
        ReplayConfig(prefetch=("eager",))
    with pytest.raises(ValueError, match="fractions in"):
        ReplayConfig(budgets=(0.0,))
    with pytest.raises(ValueError, match="feedback"):
        ReplayConfig(feedback="some")
    with pytest.raises(ValueError, match="window_blocks"):
        ReplayConfig(window_blocks=-1)
    with pytest.raises(TypeError, match="Trace"):
        replay({"query": None})
