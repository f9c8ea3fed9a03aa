"""S3-FIFO against an independent reference written from the paper and libCacheSim's S3FIFOv0."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from policies import BlockStats, make_eviction

from .eviction_drive import drive


def reference_s3fifo(requests, capacity: int, small_fraction: float = 0.1, threshold: int = 1) -> list[bool]:
    """Textbook S3-FIFO: find (ghost check), evict until there is room, insert."""
    small_cap = max(1, int(capacity * small_fraction))
    main_cap = capacity - small_cap
    small, main, ghost = OrderedDict(), OrderedDict(), OrderedDict()  # key -> freq, oldest first
    out = []
    for key in requests:
        if key in small or key in main:
            queue = small if key in small else main
            queue[key] = min(queue[key] + 1, 3)
            out.append(True)
            continue
        out.append(False)
        in_ghost = ghost.pop(key, None) is not None
        while len(small) + len(main) >= capacity:
            evicted = False
            if len(main) <= main_cap and small:
                while small and not evicted:
                    old, freq = small.popitem(last=False)
                    if freq >= threshold:
                        main[old] = 0
                    else:
                        ghost[old] = True
                        evicted = True
            while not evicted:
                old, freq = main.popitem(last=False)
                if freq > 0:
                    main[old] = freq - 1
                else:
                    evicted = True
        (main if in_ghost else small)[key] = 0
        while len(ghost) > main_cap:
            ghost.popitem(last=False)
    return out


def zipf_requests(rng: random.Random, n: int, keys: int, skew: float = 1.0) -> list[int]:
    weights = [1 / (rank + 1) ** skew for rank in range(keys)]
    return rng.choices(range(keys), weights=weights, k=n)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("capacity", [1, 3, 10, 37])
def test_hits_equal_the_reference(seed, capacity):
    rng = random.Random(seed)
    requests = zipf_requests(rng, 2000, keys=4 * capacity + 5, skew=rng.choice([0.6, 1.0, 1.3]))
    assert drive(make_eviction("s3fifo"), requests, capacity) == reference_s3fifo(requests, capacity)


def test_parameters_follow_the_reference():
    rng = random.Random(11)
    requests = zipf_requests(rng, 3000, keys=120)
    policy = make_eviction("s3fifo", small_fraction=0.25, move_to_main_hits=2)
    assert drive(policy, requests, 40) == reference_s3fifo(requests, 40, 0.25, 2)


def test_a_scan_does_not_flush_the_hot_set():
    hot = list(range(20))
    requests = hot * 3
    scan = iter(range(1000, 100000))
    for _ in range(60):
        requests += hot[:10] + [next(scan) for _ in range(30)] + hot[10:]
    s3fifo = sum(drive(make_eviction("s3fifo"), requests, 30))
    lru = sum(drive(make_eviction("lru"), requests, 30))
    assert s3fifo > 1.5 * lru


def test_candidates_change_nothing_until_the_victim_leaves():
    policy = make_eviction("s3fifo", capacity_blocks=10)
    stats = {}
    for step in range(10):
        stats[step] = BlockStats(1, "device", step, step, step)
        policy.on_insert(step, stats[step])
    for key in (0, 1, 2):  # read: they move to main when the small queue is evicted
        stats[key].last_access_step = 20 + key
        policy.on_update(key, stats[key])
    order = list(policy.candidates())
    assert order == list(policy.candidates())
    assert order[:3] != [0, 1, 2] and len(order) == 10
    policy.on_remove(order[0])
    assert list(policy.candidates()) == order[1:]
    policy.on_remove(order[5])  # not the next victim: just forgotten
    assert list(policy.candidates()) == order[1:5] + order[6:]


def test_bad_arguments():
    for kwargs in ({"small_fraction": 0}, {"small_fraction": 1.5}, {"move_to_main_hits": 0}, {"capacity_blocks": 0}):
        with pytest.raises(ValueError, match="S3FIFO"):
            make_eviction("s3fifo", **kwargs)
