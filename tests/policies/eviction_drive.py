"""Drive an eviction policy the way a store of `capacity` blocks does: make room, then insert."""

from __future__ import annotations

from policies import BlockStats


def drive(policy, requests, capacity: int) -> list[bool]:
    """Hit (True) or miss per request of `requests` (hashable keys), through the policy contract."""
    stats: dict = {}
    hits = []
    for step, key in enumerate(requests):
        if key in stats:
            stats[key].hits += 1
            stats[key].last_access_step = step
            policy.on_update(key, stats[key])
            hits.append(True)
            continue
        if len(stats) == capacity:
            victim = next(iter(policy.candidates()))
            policy.on_remove(victim)
            del stats[victim]
        stats[key] = BlockStats(1, "device", step, step, step)
        policy.on_insert(key, stats[key])
        hits.append(False)
        assert len(policy) == len(stats)
    return hits
