"""SessionRouter: the Ray Serve RequestRouter of the cluster; a thin shell over RoutingTable.

Every call of the deployment names its session first (`args[0]`); `adopt` places a session
(new, or moved after its replica died), the others follow it to its home. A call with a
`replica` keyword (describe) goes to that replica. The router runs in the process that holds
the deployment handle; the Cluster there shares its RoutingTable through table.TABLES.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# Serve pickles this module by value for the handle's process: the shared registry of tables is
# read through the table module (pickled by reference), so the Cluster and the router see one dict.
from . import table as tables
PLACING = frozenset({"adopt"})  # methods that place a session by the routing policy
RECORDING = frozenset({"adopt", "extend"})  # methods whose block hashes the replica then holds


class SessionRouter(RequestRouter):
    """Session affinity, then prefix-aware placement (policies.routing) for sessions without a home."""

    def initialize_state(self, table_key: str = "", routing: str = "prefix-affinity") -> None:
        self._table = tables.TABLES.setdefault(table_key, tables.RoutingTable(routing))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {replica.replica_id.to_full_id_str(): replica for replica in candidate_replicas}
        kwargs = pending_request.kwargs or {}
        target = kwargs.get("replica")
        if target is not None:
            return [[by_id[target]]] if target in by_id else []
        args = pending_request.args or []
        session_id = args[0] if args and isinstance(args[0], str) else None
        method = pending_request.metadata.call_method
        chosen = self._table.route(session_id, list(by_id), kwargs.get("block_hashes", ()), place=method in PLACING)
        return [[by_id[chosen]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if pending_request is None or not pending_request.args:
            return
        session_id, method = pending_request.args[0], pending_request.metadata.call_method
        replica = replica_id.to_full_id_str()
        # an extend routed away from a dead home fails there (the session is not on it): not recorded
        if method in PLACING or (method in RECORDING and self._table.home_of(session_id) == replica):
            hashes = (pending_request.kwargs or {}).get("block_hashes", ())
            self._table.record(session_id, replica, hashes)
        elif method == "close":
            self._table.forget(session_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._table.set_replicas(replica.replica_id.to_full_id_str() for replica in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.remove_replica(replica_id.to_full_id_str())
