"""The discrete-event simulation of a cluster's KV tiers over a request trace.

Events are request arrivals, in trace order. At each arrival:

1. the router (policies.routing) picks a worker from the workers' loads (requests in flight)
   and, for prefix-aware routing, the longest prefix of the request's blocks each one holds;
2. the request hits the longest prefix of its `hash_ids` held in any tier of that worker or in
   the shared tier; every other block is recomputed;
3. each of its blocks, in order, is touched as most recently used: read where it is, and
   inserted into the worker's top tier if absent there. Evictions move blocks down under the
   write policy (policies.write), which also decides when blocks get copies below;
4. the worker serves requests first come, first served, one prefill at a time: the prefill
   starts when the worker is free and takes the loads of the hit blocks from the lower tiers
   plus the compute of the recomputed tokens (the hardware profile's figures). TTFT is the
   prefill's end minus the arrival; queueing is its start minus the arrival. Decode is not
   simulated: it does not delay the first token of a prefill worker (as in Mooncake's split of
   prefill and decode instances).

hit_ratio = hit blocks / all blocks of all requests: with one worker and only a device tier of
C blocks under lru, it is LRU's block-level prefix hit ratio at capacity C, as other
simulators define it. The eviction, write and routing decisions are the registry's objects,
the same code the runtime's store calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from policies import make_eviction, make_routing, make_write

from .config import SimConfig
from .profile import HardwareProfile
from .tiers import TierCache
from .trace import Trace

DEVICE, HOST, SHARED = "device", "host", "disk"
LINK_COLUMNS = ("host_to_device_bytes", "device_to_host_bytes", "network_bytes", "disk_read_bytes", "disk_write_bytes")


class Simulation:
    """One configuration over one trace. `run()` returns the results row (a dict)."""

    def __init__(self, config: SimConfig, profile: HardwareProfile, block_tokens: int) -> None:
        self.config = config
        self.profile = profile
        self.block_tokens = block_tokens
        self.block_bytes = profile.block_bytes(block_tokens)
        self.write = make_write(config.write, **_write_args(config))
        self.router = make_routing(config.routing)
        self.shared = self._tier(SHARED, config.disk_blocks, config.disk_eviction)
        self.chains: list[list[TierCache]] = []  # per worker: its tiers, fastest first, then the shared one
        for _ in range(config.workers):
            device = self._tier(DEVICE, config.device_blocks, None)
            host = self._tier(HOST, config.host_blocks, config.host_eviction)
            self.chains.append([t for t in (device, host, self.shared) if t is not None])
        self.link_bytes = dict.fromkeys(LINK_COLUMNS, 0)
        self.step = 0

    def _tier(self, name: str, blocks: int, eviction: str | None) -> TierCache | None:
        if blocks == 0:
            return None
        return TierCache(name, blocks, make_eviction(eviction or self.config.eviction))

    def run(self, trace: Trace, progress: Callable[[int], object] | None = None) -> dict:
        """Simulate `trace`; `progress(n)` is called as requests are done."""
        workers = self.config.workers
        free_at_s = [0.0] * workers
        in_flight: list[deque[float]] = [deque() for _ in range(workers)]
        uses_prefix = self.router.uses_prefix
        n = len(trace.requests)
        ttft_s, queue_s = np.zeros(n), np.zeros(n)
        hit_blocks = blocks = recomputed_tokens = 0
        per_worker = [0] * workers
        for index, request in enumerate(trace.requests):
            now = request.arrival_s
            for done in in_flight:
                while done and done[0] <= now:
                    done.popleft()
            loads = [len(done) for done in in_flight]
            hashes = request.hash_ids
            prefix = [self._prefix_blocks(chain, hashes) for chain in self.chains] if uses_prefix else None
            w = self.router.choose(loads, prefix)
            chain = self.chains[w]
            hit, from_tier = self._hit(chain, hashes)
            for position, key in enumerate(hashes):
                self._touch(chain, key, -float(position))
            hit_tokens = min(hit * self.block_tokens, request.input_tokens)
            recompute = request.input_tokens - hit_tokens
            service_s = self._load_s(from_tier) + self.profile.prefill_overhead_s
            service_s += max(recompute, 1) * self.profile.prefill_s_per_token
            start_s = max(now, free_at_s[w])
            free_at_s[w] = start_s + service_s
            in_flight[w].append(free_at_s[w])
            ttft_s[index], queue_s[index] = free_at_s[w] - now, start_s - now
            hit_blocks += hit
            blocks += len(hashes)
            recomputed_tokens += recompute
            per_worker[w] += 1
            if progress is not None and index % 1000 == 999:
                progress(1000)
        if progress is not None:
            progress(n % 1000)
        return self._row(trace, hit_blocks, blocks, recomputed_tokens, ttft_s, queue_s, per_worker)

    def _prefix_blocks(self, chain: list[TierCache], hashes: tuple) -> int:
        stats = [t.stats for t in chain]
        count = 0
        for key in hashes:
            if not any(key in s for s in stats):
                break
            count += 1
        return count

    def _hit(self, chain: list[TierCache], hashes: tuple) -> tuple[int, dict[str, int]]:
        """Blocks of the longest cached prefix, and how many of them each tier serves (the fastest
        tier holding a block serves it)."""
        from_tier = {t.name: 0 for t in chain}
        count = 0
        for key in hashes:
            for tier in chain:
                if key in tier.stats:
                    from_tier[tier.name] += 1
                    break
            else:
                break
            count += 1
        return count, from_tier

    def _touch(self, chain: list[TierCache], key: int, score: float) -> None:
        self.step += 1
        top = chain[0]
        below = chain[1] if len(chain) > 1 else None
        if key in top.stats:
            stats = top.touch(key, self.step)
            if below is not None and key not in below.stats and self.write.write_now(stats.hits):
                self._write_down(chain, 0, key, score)
            return
        for tier in chain[1:]:
            if key in tier.stats:
                tier.touch(key, self.step)
        self._admit(chain, 0, key, score)
        if below is not None and key not in below.stats and self.write.write_now(0):
            self._write_down(chain, 0, key, score)

    def _admit(self, chain: list[TierCache], level: int, key: int, score: float) -> None:
        """Insert `key` into chain[level]; an evicted block goes down if the write policy says so."""
        victim = chain[level].admit(key, self.step, score)
        if victim is None or level + 1 == len(chain) or not self.write.write_on_evict:
            return
        gone, stats = victim
        if gone not in chain[level + 1].stats:
            self._count_write(chain[level + 1])
            self._admit(chain, level + 1, gone, stats.score)

    def _write_down(self, chain: list[TierCache], level: int, key: int, score: float) -> None:
        """Copy `key` from chain[level] into every tier below that lacks it."""
        for lower in range(level + 1, len(chain)):
            if key not in chain[lower].stats:
                self._count_write(chain[lower])
                self._admit(chain, lower, key, score)

    def _count_write(self, tier: TierCache) -> None:
        if tier.name == HOST:
            self.link_bytes["device_to_host_bytes"] += self.block_bytes
        else:
            self.link_bytes["network_bytes"] += self.block_bytes
            self.link_bytes["disk_write_bytes"] += self.block_bytes

    def _load_s(self, from_tier: dict[str, int]) -> float:
        """Seconds to bring the hit blocks held below the device up to it (counts their bytes)."""
        links, seconds = self.profile.links, 0.0
        host_bytes = from_tier.get(HOST, 0) * self.block_bytes
        if host_bytes:
            self.link_bytes["host_to_device_bytes"] += host_bytes
            seconds += links["host_device"].transfer_s(host_bytes)
        shared_bytes = from_tier.get(SHARED, 0) * self.block_bytes
        if shared_bytes:
            self.link_bytes["network_bytes"] += shared_bytes
            self.link_bytes["disk_read_bytes"] += shared_bytes
            network, disk = links["network"], links["disk"]
            seconds += network.latency_s + disk.latency_s  # streamed: the slower link sets the pace
            seconds += shared_bytes / min(network.bytes_per_s, disk.bytes_per_s)
        return seconds

    def _row(self, trace, hit_blocks, blocks, recomputed_tokens, ttft_s, queue_s, per_worker) -> dict:
        row = self.config.as_row()
        row["profile"] = self.profile.name
        row.update(
            requests=len(trace.requests),
            block_tokens=self.block_tokens,
            blocks=blocks,
            hit_blocks=hit_blocks,
            hit_ratio=hit_blocks / blocks if blocks else 0.0,
            tokens_recomputed=recomputed_tokens,
            **self.link_bytes,
        )
        tiers = {id(t): t for chain in self.chains for t in chain}.values()
        for name in (DEVICE, HOST, SHARED):
            row[f"{name}_evictions"] = sum(t.evictions for t in tiers if t.name == name)
        for name, values in (("ttft", ttft_s), ("queue", queue_s)):
            for q in (50, 90, 99):
                row[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else 0.0
            row[f"{name}_mean_s"] = float(values.mean()) if len(values) else 0.0
        row["busiest_worker_share"] = max(per_worker) / len(trace.requests) if trace.requests else 0.0
        return row


def simulate(
    trace: Trace, config: SimConfig, profile: HardwareProfile, progress: Callable[[int], object] | None = None
) -> dict:
    """The results row of `config` on `trace` under `profile`."""
    return Simulation(config, profile, trace.block_tokens).run(trace, progress)


def _write_args(config: SimConfig) -> dict:
    return {"hit_threshold": config.hit_threshold} if config.write == "write-through-selective" else {}
