"""The replicas' metrics, plain part: increments between two snapshots of a session's statistics."""

from __future__ import annotations

from runtime.cluster.metrics import METRICS, TIER_FIELDS, TOKEN_FIELDS, usage_deltas


def test_increments_between_snapshots():
    before = {"prefill_tokens": 10, "decode_tokens": 2, "reused_tokens": 0, "recomputed_tokens": 0,
              "store": {"tiers": {"device": {"hits": 5, "misses": 1, "bytes_in": 100, "bytes_out": 0, "wait_s": 0.0}}}}
    after = {"prefill_tokens": 30, "decode_tokens": 2, "reused_tokens": 64, "recomputed_tokens": 0,
             "store": {"tiers": {"device": {"hits": 9, "misses": 1, "bytes_in": 100, "bytes_out": 0, "wait_s": 0.0},
                                 "shared": {"hits": 2, "misses": 0, "bytes_in": 0, "bytes_out": 512, "wait_s": 0.25}}}}
    got = {(metric, tags.get("tier")): delta for metric, tags, delta in usage_deltas(before, after)}
    assert got == {("tiered_prefilled_tokens", None): 20, ("tiered_reused_tokens", None): 64,
                   ("tiered_tier_hits", "device"): 4, ("tiered_tier_hits", "shared"): 2,
                   ("tiered_tier_bytes_out", "shared"): 512, ("tiered_prefetch_stall_s", "shared"): 0.25}
    assert usage_deltas({}, {}) == []


def test_every_metric_is_declared_once_with_units_in_its_name():
    assert set(TOKEN_FIELDS) | set(TIER_FIELDS) <= set(METRICS)
    for name, (kind, tags, description) in METRICS.items():
        assert name.startswith("tiered_") and kind in ("counter", "gauge", "histogram") and description
        assert "replica" in tags
