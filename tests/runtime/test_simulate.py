"""The simulator's hit ratio against brute-force references, and its time model by hand."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from policies import EVICTION
from runtime.simulate import SimConfig, Trace, TraceRequest, load_profile, read_trace, simulate

DATA = Path(__file__).parent.parent / "data"
FULL_TRACE = DATA / "mooncake_conversation_trace.jsonl.gz"


class ReferenceCache:
    """A cache of `capacity` blocks in plain lists; `victim()` is the policy, written from its
    definition, not from our code. Keys are block hashes; position is the block's index in its
    request (the simulator's importance score is minus that index)."""

    def __init__(self, policy: str, capacity: int) -> None:
        self.policy, self.capacity = policy, capacity
        self.blocks: dict[int, dict] = {}  # key -> {"inserted", "used", "reads", "position"}
        self.clock = 0
        # S3-FIFO and ARC state
        self.small, self.main, self.ghost, self.freq = [], [], [], {}
        self.t1, self.t2, self.b1, self.b2, self.p = [], [], [], [], 0.0

    def __contains__(self, key: int) -> bool:
        return key in self.blocks

    def touch(self, key: int, position: int) -> None:
        self.clock += 1
        if key in self.blocks:
            block = self.blocks[key]
            block["used"], block["reads"] = self.clock, block["reads"] + 1
            if self.policy == "s3fifo":
                self.freq[key] = min(self.freq[key] + 1, 3)
            if self.policy == "arc":
                (self.t1 if key in self.t1 else self.t2).remove(key)
                self.t2.append(key)
            return
        if len(self.blocks) == self.capacity:
            del self.blocks[self.victim()]
        self.blocks[key] = {"inserted": self.clock, "used": self.clock, "reads": 0, "position": position}
        self.arrive(key)

    def victim(self) -> int:
        b = self.blocks
        if self.policy == "lru":
            return min(b, key=lambda k: b[k]["used"])
        if self.policy == "fifo":
            return min(b, key=lambda k: b[k]["inserted"])
        if self.policy == "lfu":
            return min(b, key=lambda k: (b[k]["reads"], b[k]["used"]))
        if self.policy == "importance":  # lowest score (deepest block) first, then least recently used
            return min(b, key=lambda k: (-b[k]["position"], b[k]["used"]))
        if self.policy == "s3fifo":
            small_cap = max(1, int(self.capacity * 0.1))
            while True:
                if self.small and len(self.main) <= self.capacity - small_cap:
                    while self.small:
                        key = self.small.pop(0)
                        if self.freq[key] >= 1:
                            self.main.append(key)
                            self.freq[key] = 0
                        else:
                            self.ghost.append(key)
                            return key
                key = self.main.pop(0)
                if self.freq[key] == 0:
                    return key
                self.freq[key] -= 1
                self.main.append(key)
        if self.policy == "arc":
            if self.t1 and (len(self.t1) > self.p or not self.t2):
                key = self.t1.pop(0)
                self.b1.append(key)
            else:
                key = self.t2.pop(0)
                self.b2.append(key)
            return key
        raise AssertionError(self.policy)

    def arrive(self, key: int) -> None:
        c = self.capacity
        if self.policy == "s3fifo":
            self.freq[key] = 0
            if key in self.ghost:
                self.ghost.remove(key)
                self.main.append(key)
            else:
                self.small.append(key)
            del self.ghost[: max(0, len(self.ghost) - (c - max(1, int(c * 0.1))))]
        if self.policy == "arc":
            if key in self.b1:
                self.p = min(self.p + max(len(self.b2) / len(self.b1), 1), c)
                self.b1.remove(key)
                self.t2.append(key)
            elif key in self.b2:
                self.p = max(self.p - max(len(self.b1) / len(self.b2), 1), 0)
                self.b2.remove(key)
                self.t2.append(key)
            else:
                self.t1.append(key)
                if len(self.t1) + len(self.b1) > c and self.b1:
                    self.b1.pop(0)
                elif len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and self.b2:
                    self.b2.pop(0)


def reference_hit_ratio(trace: Trace, policy: str, capacity: int, workers: int = 1) -> float:
    """The issue's definition, on one cache per worker (requests dealt round-robin)."""
    caches = [ReferenceCache(policy, capacity) for _ in range(workers)]
    hits = blocks = 0
    for index, request in enumerate(trace.requests):
        cache = caches[index % workers]
        prefix = 0
        while prefix < len(request.hash_ids) and request.hash_ids[prefix] in cache:
            prefix += 1
        for position, key in enumerate(request.hash_ids):
            cache.touch(key, position)
        hits += prefix
        blocks += len(request.hash_ids)
    return hits / blocks


def random_trace(seed: int, requests: int = 300) -> Trace:
    """Requests that extend random earlier prefixes (a prefix tree of block hashes)."""
    rng = random.Random(seed)
    prefixes: list[tuple[int, ...]] = [()]
    fresh = iter(range(10**9))
    out = []
    for index in range(requests):
        base = rng.choice(prefixes)[: rng.randrange(0, 12)]
        hashes = base + tuple(next(fresh) for _ in range(rng.randrange(1, 6)))
        prefixes.append(hashes)
        tokens = len(hashes) * 16 - rng.randrange(16)
        out.append(TraceRequest(index * 0.1, tokens, 10, hashes))
    return Trace(out, 16, f"random-{seed}")


@pytest.fixture(scope="module")
def profile():
    return load_profile("h200-nvlink-c2c")


@pytest.mark.parametrize("policy", sorted(EVICTION))
@pytest.mark.parametrize("seed", range(3))
def test_hit_ratio_equals_the_brute_force_reference(policy, seed, profile):
    trace = random_trace(seed)
    for capacity in (4, 17, 60):
        config = SimConfig(workers=1, device_blocks=capacity, host_blocks=0, disk_blocks=0, eviction=policy)
        row = simulate(trace, config, profile)
        assert row["hit_ratio"] == pytest.approx(reference_hit_ratio(trace, policy, capacity), abs=1e-12)
        assert row["blocks"] == trace.blocks


def test_round_robin_workers_are_separate_caches(profile):
    trace = random_trace(7, requests=400)
    config = SimConfig(workers=3, device_blocks=20, eviction="lru", routing="round-robin")
    assert simulate(trace, config, profile)["hit_ratio"] == pytest.approx(reference_hit_ratio(trace, "lru", 20, 3))


def test_a_huge_shared_tier_is_an_infinite_cache(profile):
    trace = random_trace(3, requests=400)
    seen, hits = set(), 0
    for request in trace.requests:  # infinite cache: a block hits once it has ever been seen
        prefix = 0
        while prefix < len(request.hash_ids) and request.hash_ids[prefix] in seen:
            prefix += 1
        hits += prefix
        seen.update(request.hash_ids)
    # write-back: one worker, whose evictions all reach the shared tier
    config = SimConfig(workers=1, device_blocks=5, disk_blocks=10**6, write="write-back")
    assert simulate(trace, config, profile)["hit_ratio"] == pytest.approx(hits / trace.blocks)
    # write-through: every block reaches the shared tier at once, so every worker sees every block
    config = SimConfig(workers=3, device_blocks=5, disk_blocks=10**6, write="write-through", routing="round-robin")
    assert simulate(trace, config, profile)["hit_ratio"] == pytest.approx(hits / trace.blocks)
    # write-back on several workers: a block still on another worker's device is out of reach
    config = SimConfig(workers=3, device_blocks=5, disk_blocks=10**6, write="write-back", routing="round-robin")
    assert simulate(trace, config, profile)["hit_ratio"] < hits / trace.blocks


def test_the_conversation_trace_infinite_cache_ratio_is_36_6_percent(profile):
    trace = read_trace(FULL_TRACE)
    assert len(trace.requests) == 12031
    config = SimConfig(workers=1, device_blocks=64, disk_blocks=10**7)
    assert round(simulate(trace, config, profile)["hit_ratio"], 3) == 0.366


def test_host_and_shared_tiers_add_hits_and_count_bytes(profile):
    trace = random_trace(5, requests=400)
    base = simulate(trace, SimConfig(device_blocks=10), profile)
    host = simulate(trace, SimConfig(device_blocks=10, host_blocks=40), profile)
    assert host["hit_ratio"] > base["hit_ratio"]
    block_bytes = profile.block_bytes(trace.block_tokens)
    assert base["host_to_device_bytes"] == base["device_to_host_bytes"] == 0
    assert host["host_to_device_bytes"] > 0 and host["host_to_device_bytes"] % block_bytes == 0
    # write-back writes a block down only when the device evicts one the host lacks
    assert 0 < host["device_to_host_bytes"] <= host["device_evictions"] * block_bytes


def test_write_policies_trade_bytes_for_hits(profile):
    trace = random_trace(9, requests=500)
    rows = {
        write: simulate(trace, SimConfig(device_blocks=10, host_blocks=30, write=write), profile)
        for write in ("write-through", "write-through-selective", "write-back")
    }
    written = {w: r["device_to_host_bytes"] for w, r in rows.items()}
    block_bytes = profile.block_bytes(trace.block_tokens)
    assert written["write-through"] >= trace.blocks * block_bytes * 0.5  # most blocks are new: all written
    assert written["write-through-selective"] < written["write-through"]
    assert written["write-back"] < written["write-through"]


def test_prefix_affinity_beats_round_robin_on_shared_prefixes(profile):
    trace = random_trace(11, requests=600)
    rows = {
        routing: simulate(trace, SimConfig(workers=4, device_blocks=40, routing=routing), profile)
        for routing in ("round-robin", "prefix-affinity")
    }
    assert rows["prefix-affinity"]["hit_ratio"] > rows["round-robin"]["hit_ratio"]


def test_ttft_and_queueing_follow_the_profile(profile):
    block_tokens = 16
    same = (1, 2, 3)
    trace = Trace(
        [
            TraceRequest(0.0, 48, 1, same),
            TraceRequest(0.0, 40, 1, (4, 5, 6)),  # arrives with the first: waits for it
            TraceRequest(100.0, 48, 1, same),  # all three blocks on the device
        ],
        block_tokens,
    )
    row = simulate(trace, SimConfig(workers=1, device_blocks=100), profile)
    per_token, overhead = profile.prefill_s_per_token, profile.prefill_overhead_s
    first, second, third = overhead + 48 * per_token, overhead + 40 * per_token, overhead + per_token
    assert row["hit_blocks"] == 3 and row["tokens_recomputed"] == 48 + 40
    assert row["queue_p50_s"] == 0.0 and row["queue_mean_s"] == pytest.approx(first / 3)
    assert row["ttft_p50_s"] == pytest.approx(first)
    assert row["ttft_mean_s"] == pytest.approx((first + (first + second) + third) / 3)


def test_loads_from_host_cost_link_time(profile):
    requests = [TraceRequest(0.0, 32, 1, (1, 2)), TraceRequest(10.0, 32, 1, (3, 4)), TraceRequest(20.0, 32, 1, (1, 2))]
    trace = Trace(requests, 16)
    row = simulate(trace, SimConfig(device_blocks=2, host_blocks=10), profile)
    link = profile.links["host_device"]
    nbytes = 2 * profile.block_bytes(16)
    cold = profile.prefill_overhead_s + 32 * profile.prefill_s_per_token
    warm = profile.prefill_overhead_s + profile.prefill_s_per_token + link.transfer_s(nbytes)
    assert row["hit_blocks"] == 2 and row["host_to_device_bytes"] == nbytes and row["tokens_recomputed"] == 64
    assert row["ttft_mean_s"] == pytest.approx((2 * cold + warm) / 3)
    assert warm < cold
