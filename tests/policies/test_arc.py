"""ARC against an independent reference written from the paper's pseudocode (FAST 2003, Fig. 4),
with the one change the eviction contract forces: REPLACE runs before the arrival is known."""

from __future__ import annotations

import random

import pytest

from policies import BlockStats, make_eviction

from .eviction_drive import drive
from .test_s3fifo import zipf_requests


def reference_arc(requests, c: int) -> list[bool]:
    t1, t2, b1, b2 = [], [], [], []  # LRU first
    p = 0.0
    out = []

    def replace():
        if t1 and (len(t1) > p or not t2):
            b1.append(t1.pop(0))
        else:
            b2.append(t2.pop(0))

    for x in requests:
        if x in t1 or x in t2:  # case I
            (t1 if x in t1 else t2).remove(x)
            t2.append(x)
            out.append(True)
            continue
        out.append(False)
        if len(t1) + len(t2) == c:
            replace()
        if x in b1:  # case II
            p = min(p + max(len(b2) / len(b1), 1.0), c)
            b1.remove(x)
            t2.append(x)
        elif x in b2:  # case III
            p = max(p - max(len(b1) / len(b2), 1.0), 0.0)
            b2.remove(x)
            t2.append(x)
        else:  # case IV
            t1.append(x)
            if len(t1) + len(b1) > c and b1:
                b1.pop(0)
            elif len(t1) + len(t2) + len(b1) + len(b2) > 2 * c and b2:
                b2.pop(0)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("capacity", [1, 3, 10, 37])
def test_hits_equal_the_reference(seed, capacity):
    rng = random.Random(seed)
    requests = zipf_requests(rng, 2000, keys=4 * capacity + 5, skew=rng.choice([0.6, 1.0, 1.3]))
    assert drive(make_eviction("arc"), requests, capacity) == reference_arc(requests, capacity)


def test_target_adapts_to_the_workload():
    recency = make_eviction("arc")
    drive(recency, [k for start in range(0, 400, 5) for k in range(start, start + 20)], 20)  # sliding window
    frequency = make_eviction("arc")
    scan = iter(range(1000, 10**6))
    drive(frequency, [k for _ in range(50) for k in list(range(10)) + [next(scan) for _ in range(25)]], 20)
    assert recency.target_t1 > frequency.target_t1


def test_beats_lru_on_a_hot_set_with_scans():
    hot = list(range(15))
    scan = iter(range(1000, 10**6))
    requests = hot + hot + [k for _ in range(80) for k in hot + [next(scan) for _ in range(12)]]
    arc, lru = sum(drive(make_eviction("arc"), requests, 20)), sum(drive(make_eviction("lru"), requests, 20))
    assert lru == 30  # the cycle is longer than the cache: LRU hits only until the first scan
    assert arc > 40 * 15


def test_a_read_moves_a_block_behind_the_once_read():
    policy = make_eviction("arc", capacity_blocks=4)
    stats = {k: BlockStats(1, "device", k, k, k) for k in range(4)}
    for k in range(4):
        policy.on_insert(k, stats[k])
    stats[0].hits = 1
    policy.on_update(0, stats[0])
    assert list(policy.candidates()) == [1, 2, 3, 0]
    policy.on_update(0, stats[0])  # nothing new was read: no move
    assert list(policy.candidates()) == [1, 2, 3, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ARC"):
        make_eviction("arc", capacity_blocks=0)
