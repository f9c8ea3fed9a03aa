"""ReplicaBackend: what a ClusterSession needs of its cluster, over the ingress's DeploymentHandle.

The ingress replica holds the handle to the SessionReplica deployment, so the SessionRouter runs
in its process; the backend registers the RoutingTable there (table.TABLES[table_key]) before the
first call, and ClusterSession (its token log, placement by block hashes, failover) works on it
unchanged: the HTTP front and the Python API route through one router.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ray.serve.handle import DeploymentHandle

from runtime.cluster.cluster import input_errors_unwrapped
from runtime.cluster.table import TABLES, RoutingTable
from runtime.model.tokenizer import Tokenizer


class ReplicaBackend:
    """handle   the SessionReplica deployment's handle (routed by SessionRouter over TABLES[table_key])"""

    def __init__(self, handle: DeploymentHandle, table_key: str, routing: str, block_tokens: int,
                 call_timeout_s: float, failover_timeout_s: float) -> None:
        self._handle = handle
        self.table: RoutingTable = TABLES.setdefault(table_key, RoutingTable(routing))
        self.block_tokens = block_tokens
        self.call_timeout_s, self.failover_timeout_s = call_timeout_s, failover_timeout_s
        self._ready = threading.Lock()
        self._model: dict | None = None
        self._tokenizer: Tokenizer | None = None

    # -- what the ingress asks once -------------------------------------------------------------

    def model_info(self) -> dict:
        """The model's shape, fingerprint and context (max_tokens), from a replica, fetched once."""
        self._load()
        return self._model

    @property
    def fingerprint(self) -> str:
        return self.model_info()["fingerprint"]

    @property
    def tokenizer(self) -> Tokenizer:
        self._load()
        return self._tokenizer

    # -- what ClusterSession calls --------------------------------------------------------------

    def call(self, method: str, *args, **kwargs):
        with input_errors_unwrapped():
            return getattr(self._handle, method).remote(*args, **kwargs).result(timeout_s=self.call_timeout_s)

    def stream(self, session_id: str, max_new_tokens: int, temperature: float, seed: int | None,
               top_p: float = 1.0) -> Iterator[int]:
        """The replica's tokens; a consumer that stops early cancels the replica's generation."""
        tokens = self._handle.options(method_name="stream", stream=True).remote(
            session_id, max_new_tokens, temperature, seed, top_p)
        finished = False
        try:
            with input_errors_unwrapped():
                yield from tokens
            finished = True
        finally:
            if not finished:
                tokens.cancel()

    def adopt(self, session_id: str, options: dict, tokens: list[int], block_hashes: list[str]) -> dict:
        return self.call("adopt", session_id, options, tokens, block_hashes=block_hashes)

    def _load(self) -> None:
        with self._ready:
            if self._model is None:
                info = self.call("describe")["model"]
                self._tokenizer = Tokenizer.from_json(self.call("tokenizer_json"))
                self._model = info
