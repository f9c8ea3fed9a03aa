"""The cluster's metrics: what each replica counts, exported through `ray.util.metrics` at Ray's
Prometheus endpoint (Ray prefixes every name with `ray_`, and counters end in `_total`).

`usage_deltas` is the plain part (tested without Ray): the increments between two snapshots of
a session's and a store's statistics. `ReplicaMetrics` records them on Ray's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

# name -> (kind, tag keys, description); the table in the README is this one
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tiered_prefilled_tokens": ("counter", ("replica",), "prompt tokens computed (prefill), recomputed ones included"),
    "tiered_reused_tokens": ("counter", ("replica",), "tokens whose KV blocks were taken from a tier instead of computed"),
    "tiered_recomputed_tokens": ("counter", ("replica",), "tokens computed again because their blocks were lost"),
    "tiered_decoded_tokens": ("counter", ("replica",), "tokens generated (decode steps)"),
    "tiered_tier_hits": ("counter", ("replica", "tier"), "reads served by the tier"),
    "tiered_tier_misses": ("counter", ("replica", "tier"), "reads that looked in the tier and did not find the block"),
    "tiered_tier_bytes_in": ("counter", ("replica", "tier"), "bytes written into the tier"),
    "tiered_tier_bytes_out": ("counter", ("replica", "tier"), "bytes read out of the tier"),
    "tiered_prefetch_stall_s": ("counter", ("replica", "tier"), "seconds reads waited for blocks brought up from the tier"),
    "tiered_open_sessions": ("gauge", ("replica",), "sessions the replica hosts"),
    "tiered_request_latency_s": ("histogram", ("replica", "method"), "seconds a replica call took"),
    "tiered_step_sequences": ("histogram", ("replica",), "calls one batched forward step computed (continuous batching)"),
    "tiered_running_calls": ("gauge", ("replica",), "extends and streams in the replica's step loop"),
}
TOKEN_FIELDS = {"tiered_prefilled_tokens": "prefill_tokens", "tiered_reused_tokens": "reused_tokens",
                "tiered_recomputed_tokens": "recomputed_tokens", "tiered_decoded_tokens": "decode_tokens"}
TIER_FIELDS = {"tiered_tier_hits": "hits", "tiered_tier_misses": "misses", "tiered_tier_bytes_in": "bytes_in",
               "tiered_tier_bytes_out": "bytes_out", "tiered_prefetch_stall_s": "wait_s"}
LATENCY_BOUNDARIES_S = [0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0]
SEQUENCES_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
BOUNDARIES = {"tiered_request_latency_s": LATENCY_BOUNDARIES_S, "tiered_step_sequences": SEQUENCES_BOUNDARIES}


def usage_deltas(before: Mapping, after: Mapping) -> list[tuple[str, dict[str, str], float]]:
    """(metric, tags, increment) from a session's stats() before and after a call (either may be
    empty: a new session, or a store seen for the first time). Only positive increments."""
    out = []
    for metric, field in TOKEN_FIELDS.items():
        delta = after.get(field, 0) - before.get(field, 0)
        if delta > 0:
            out.append((metric, {}, delta))
    tiers_before = before.get("store", {}).get("tiers", {})
    for tier, counts in after.get("store", {}).get("tiers", {}).items():
        for metric, field in TIER_FIELDS.items():
            delta = counts.get(field, 0) - tiers_before.get(tier, {}).get(field, 0)
            if delta > 0:
                out.append((metric, {"tier": tier}, delta))
    return out


class ReplicaMetrics:
    """The metrics of one replica, tagged with its id. Keeps the last statistics it saw of each
    session and of the store, so each call records what changed since."""

    def __init__(self, replica_id: str) -> None:
        from ray.util import metrics

        kinds = {"counter": metrics.Counter, "gauge": metrics.Gauge}
        self.replica_id = replica_id
        self._metrics = {}
        for name, (kind, tags, description) in METRICS.items():
            if kind == "histogram":
                self._metrics[name] = metrics.Histogram(name, description=description, boundaries=BOUNDARIES[name],
                                                        tag_keys=tags)
            else:
                self._metrics[name] = kinds[kind](name, description=description, tag_keys=tags)
        self._tokens_seen: dict[str, dict] = {}
        self._store_seen: dict = {}

    def record(self, session_id: str, stats: Mapping, method: str, seconds: float, open_sessions: int) -> None:
        """After a call of `method` on `session_id` that took `seconds`: its stats() now."""
        tags = {"replica": self.replica_id}
        tokens_before = self._tokens_seen.get(session_id, {})
        for metric, extra, delta in usage_deltas({**tokens_before, "store": self._store_seen}, stats):
            self._metrics[metric].inc(delta, tags={**tags, **extra})
        self._tokens_seen[session_id] = {field: stats.get(field, 0) for field in TOKEN_FIELDS.values()}
        self._store_seen = stats.get("store", self._store_seen)
        self.observe(method, seconds, open_sessions)

    def observe(self, method: str, seconds: float, open_sessions: int) -> None:
        tags = {"replica": self.replica_id}
        self._metrics["tiered_request_latency_s"].observe(seconds, tags={**tags, "method": method})
        self._metrics["tiered_open_sessions"].set(open_sessions, tags=tags)

    def observe_step(self, sequences: int, running: int) -> None:
        """After a forward step of the replica's loop that computed `sequences` calls' tokens."""
        tags = {"replica": self.replica_id}
        self._metrics["tiered_step_sequences"].observe(sequences, tags=tags)
        self._metrics["tiered_running_calls"].set(running, tags=tags)

    def forget(self, session_id: str) -> None:
        self._tokens_seen.pop(session_id, None)
