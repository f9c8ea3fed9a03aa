"""RoutingTable: what the cluster's router knows, and its decisions, as a plain class (no Ray).

It keeps, per replica, the sessions it hosts and the content hashes of the blocks routed to it
(the replica computed or reused them, so it holds them, or its store evicted them; the table
does not hear of evictions, like Serve's PrefixCacheAffinityRouter's tree). Its decisions:

- a session's calls go to its home replica while that replica is live;
- a session without a live home (new, or its replica died) goes where the routing policy
  (policies.routing: prefix-affinity by default) sends it, given each replica's load (sessions
  it hosts) and the number of leading block hashes of the session's log it holds.

Replica ids are opaque strings (Serve's full replica id in the router). Thread-safe: the router
calls it from Serve's event loop, the Cluster from the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from policies.routing import RoutingPolicy, make_routing


class RoutingTable:
    """routing   a policies.routing name, or a RoutingPolicy instance"""

    def __init__(self, routing: str | RoutingPolicy = "prefix-affinity") -> None:
        if isinstance(routing, str):
            routing = make_routing(routing)
        if not isinstance(routing, RoutingPolicy):
            raise TypeError(f"routing must be a policy name or a RoutingPolicy, got {type(routing).__name__}")
        self.policy = routing
        self._lock = threading.Lock()
        self._replicas: list[str] = []  # live replicas, in the order they appeared
        self._homes: dict[str, str] = {}  # session id -> replica id
        self._blocks: dict[str, set[str]] = {}  # replica id -> block hashes (hex) routed to it

    # -- what the router tells the table --------------------------------------------------------

    def set_replicas(self, replica_ids: Iterable[str]) -> None:
        """The live replicas are exactly `replica_ids`; what was known of the others is dropped."""
        live = list(dict.fromkeys(replica_ids))
        with self._lock:
            for gone in set(self._replicas) - set(live):
                self._drop(gone)
            self._replicas = [r for r in self._replicas if r in live] + [r for r in live if r not in self._replicas]

    def remove_replica(self, replica_id: str) -> None:
        """`replica_id` died: its sessions have no home until they are placed again."""
        with self._lock:
            self._drop(replica_id)
            self._replicas = [r for r in self._replicas if r != replica_id]

    def record(self, session_id: str, replica_id: str, block_hashes: Sequence[str] = ()) -> None:
        """`session_id` now lives on `replica_id`, which holds the blocks of `block_hashes`."""
        with self._lock:
            self._homes[session_id] = replica_id
            self._blocks.setdefault(replica_id, set()).update(block_hashes)

    def forget(self, session_id: str) -> None:
        """`session_id` was closed (its blocks stay where they are cached)."""
        with self._lock:
            self._homes.pop(session_id, None)

    # -- decisions ------------------------------------------------------------------------------

    def home_of(self, session_id: str) -> str | None:
        """The replica hosting `session_id`, or None."""
        with self._lock:
            return self._homes.get(session_id)

    def route(self, session_id: str | None, candidates: Sequence[str], block_hashes: Sequence[str] = (),
              place: bool = False) -> str:
        """The candidate a call of `session_id` goes to: its live home unless `place` (a new
        placement) is asked for, else the policy's choice. A placement makes the choice the
        session's home at once, so placements routed before the first of them reaches its replica
        see its load. ValueError without candidates."""
        if not candidates:
            raise ValueError("no replica to route to")
        with self._lock:
            home = self._homes.get(session_id) if session_id is not None else None
            if home in candidates and not place:
                return home
            # sessions each candidate hosts; a session placed again no longer counts where it was
            loads = [sum(1 for s, h in self._homes.items() if h == r and s != session_id) for r in candidates]
            prefix = [self._prefix_blocks(r, block_hashes) for r in candidates] if self.policy.uses_prefix else None
            chosen = candidates[self.policy.choose(loads, prefix)]
            if place and session_id is not None:
                self._homes[session_id] = chosen
            return chosen

    def prefix_blocks(self, replica_id: str, block_hashes: Sequence[str]) -> int:
        """How many leading blocks of `block_hashes` were routed to `replica_id`."""
        with self._lock:
            return self._prefix_blocks(replica_id, block_hashes)

    def snapshot(self) -> dict:
        """Live replicas, each with its sessions and the number of block hashes routed to it."""
        with self._lock:
            return {r: {"sessions": sorted(s for s, h in self._homes.items() if h == r),
                        "blocks_routed": len(self._blocks.get(r, ()))} for r in self._replicas}

    # -- internals (lock held) ------------------------------------------------------------------

    def _prefix_blocks(self, replica_id: str, block_hashes: Sequence[str]) -> int:
        held = self._blocks.get(replica_id, set())
        count = 0
        for digest in block_hashes:
            if digest not in held:
                break
            count += 1
        return count

    def _drop(self, replica_id: str) -> None:
        self._blocks.pop(replica_id, None)
        for session_id in [s for s, h in self._homes.items() if h == replica_id]:
            del self._homes[session_id]


TABLES: dict[str, RoutingTable] = {}  # table key -> the table of a Cluster in this process (its router reads it)
