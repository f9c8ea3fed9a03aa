"""ClusterSession: a session of the cluster, used like runtime.Session; survives its replica's death.

The handle keeps the session's token log (every token it sent or received), so when the replica
hosting the session dies, or no longer hosts it, the next call places the session again (the
router picks a live replica) and the replica rebuilds it from the log: blocks its store holds are
reused, the rest recomputed. Greedy generation continues as it would have without the failure.

With a recorder (runtime.trace_recorder.TraceRecorder), each turn (an extend, then the stream or
generate after it) becomes one request line, as runtime.Session records it: stamped when the
extend began, the stores' block digests as hash_ids, the session and the replica that served it,
and ttft_s from the extend's start to the first streamed token (as a client sees it; the
extend's own seconds when no token followed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ray.exceptions import ActorUnavailableError, RayActorError

from tiered.checked import NonNegative, NonNegativeNumber, PositiveFraction, checked
from tiered.content import chain_hashes, chain_root

from .replica import SessionMissing

if TYPE_CHECKING:
    from ..trace_recorder import TraceRecorder
    from .cluster import Cluster

FAILOVER_ERRORS = (RayActorError, ActorUnavailableError, SessionMissing)
RETRY_PAUSE_S = 0.2


class ClusterSession:
    """A handle on session `session_id` of `cluster`; open it with Cluster.open."""

    def __init__(self, cluster: Cluster, session_id: str, options: dict,
                 recorder: TraceRecorder | None = None) -> None:
        self.cluster = cluster
        self.session_id = session_id
        self.options = dict(options)
        self.tokens: list[int] = []  # the token log: the source of truth when a replica is lost
        self.failovers = 0  # times the session was placed again after its replica was lost
        self._root = chain_root(cluster.fingerprint, cluster.block_tokens, self.options.get("cache_salt", ""))
        self._placed = False
        self._closed = False
        self._recorder = recorder
        self._turn: dict | None = None  # the turn being recorded: its line's fields but the output

    @property
    def block_hashes(self) -> list[str]:
        """Content hashes (hex) of the full blocks of the token log, as the stores address them."""
        return [digest.hex() for digest in chain_hashes(self._root, self.tokens, self.cluster.block_tokens)]

    def extend(self, token_ids: Iterable[int]) -> int:
        """Feed tokens; returns how many tokens the session holds."""
        ids = _check_ids(token_ids)
        self._check_open()
        self._end_turn(0)
        arrival_s = self._recorder.now_s() if self._recorder is not None else 0.0
        held = self._extend(ids)
        if self._recorder is not None:
            self._turn = {"token_ids": list(self.tokens), "arrival_s": arrival_s,
                          "ttft_s": self._recorder.now_s() - arrival_s, "streamed": False}
        return held

    def _extend(self, ids: list[int]) -> int:
        if not self._placed:
            self._place(self.tokens + ids)
            self.tokens += ids
            return len(self.tokens)
        hashes = [d.hex() for d in chain_hashes(self._root, self.tokens + ids, self.cluster.block_tokens)]
        try:
            held = self.cluster.call("extend", self.session_id, ids, block_hashes=hashes)
        except FAILOVER_ERRORS:
            self._failover(self.tokens + ids)
            held = len(self.tokens) + len(ids)
        self.tokens += ids
        return held

    @checked
    def stream(self, max_new_tokens: NonNegative, temperature: NonNegativeNumber = 0.0, seed: int | None = None,
               top_p: PositiveFraction = 1.0) -> Iterator[int]:
        """Generate up to `max_new_tokens` tokens (greedy at temperature 0), yielding each; a
        replica lost midway is replaced and generation goes on (sampled runs then draw anew).
        The arguments are checked now, before any token."""
        self._check_open()
        if not self.tokens:
            raise ValueError("generate needs a prompt: call extend() first")
        return self._stream(max_new_tokens, temperature, seed, top_p)

    def _stream(self, max_new_tokens: int, temperature: float, seed: int | None, top_p: float) -> Iterator[int]:
        if not self._placed:  # resumed from a save: placed where the longest prefix of it is
            self._place(self.tokens)
        produced = 0
        deadline_s = time.monotonic() + self.cluster.failover_timeout_s
        try:
            while True:
                try:
                    for token in self.cluster.stream(self.session_id, max_new_tokens - produced, temperature, seed,
                                                     top_p):
                        self.tokens.append(token)
                        produced += 1
                        self._first_token()
                        yield token
                    return
                except FAILOVER_ERRORS:
                    if time.monotonic() > deadline_s:
                        raise
                    self._failover(self.tokens)
        finally:
            self._end_turn(produced)

    def generate(self, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 top_p: float = 1.0) -> list[int]:
        """The tokens stream() yields, as a list."""
        return list(self.stream(max_new_tokens, temperature, seed, top_p))

    def stats(self) -> dict:
        """The session's statistics on its replica (runtime.Session.stats) with replica_id,
        actor_name and node_id of that replica, and the handle's failovers."""
        return {**self._call("stats"), "failovers": self.failovers}

    def save(self) -> str:
        """Save the session on its replica's disk tier; returns the manifest's path."""
        return self._call("save")

    @property
    def replica_id(self) -> str | None:
        """The Serve replica id of the replica hosting the session, or None before it is placed."""
        return self.cluster.table.home_of(self.session_id)

    def close(self) -> None:
        """Close the session on its replica (shared blocks stay cached). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._end_turn(0)
        if self._placed:
            try:
                self.cluster.call("close", self.session_id)
            except FAILOVER_ERRORS:
                pass  # its replica is gone, and the session with it
        self.cluster.table.forget(self.session_id)

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str):
        self._check_open()
        if not self._placed:
            self._place(self.tokens)
        try:
            return self.cluster.call(method, self.session_id)
        except FAILOVER_ERRORS:
            self._failover(self.tokens)
            return self.cluster.call(method, self.session_id)

    def _place(self, tokens: list[int]) -> None:
        """Place the session on a replica (the router picks it) from `tokens`, retrying until the
        cluster's failover_timeout_s while replicas are lost: also a first placement whose replica
        dies under it."""
        hashes = [d.hex() for d in chain_hashes(self._root, tokens, self.cluster.block_tokens)]
        deadline_s = time.monotonic() + self.cluster.failover_timeout_s
        while True:
            try:
                self.cluster.adopt(self.session_id, self.options, tokens, hashes)
                self._placed = True
                return
            except FAILOVER_ERRORS:
                if time.monotonic() > deadline_s:
                    raise
                time.sleep(RETRY_PAUSE_S)  # a back-off: Serve is replacing the replica

    def _failover(self, tokens: list[int]) -> None:
        """Place the session again, on a live replica, after its replica was lost."""
        self._place(tokens)
        self.failovers += 1

    def _first_token(self) -> None:
        turn = self._turn
        if turn is not None and not turn["streamed"]:
            turn["streamed"] = True
            turn["ttft_s"] = self._recorder.now_s() - turn["arrival_s"]

    def _end_turn(self, output_tokens: int) -> None:
        """Write the turn being recorded, with the tokens generated after its extend."""
        turn, self._turn = self._turn, None
        if turn is None:
            return
        tokens = turn.pop("token_ids")
        del turn["streamed"]
        digests = chain_hashes(self._root, tokens, self.cluster.block_tokens)
        self._recorder.record(tokens, output_tokens, block_digests=digests, session=self.session_id,
                              replica=self.replica_id, **turn)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"session {self.session_id!r} is closed")


def _check_ids(token_ids: Iterable[int]) -> list[int]:
    if isinstance(token_ids, (str, bytes)):
        raise TypeError("token_ids must be ints, not text: encode it first")
    ids = [int(t) if hasattr(t, "__index__") else t for t in token_ids]
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise TypeError(f"token_ids must be non-negative ints, got {t!r}")
    return ids
