"""Cluster: session workers as the replicas of a Ray Serve deployment, behind the SessionRouter.

    with Cluster(model="smollm2-135m", workers=2, store_config=StoreConfig(...)) as cluster:
        session = cluster.open()
        session.extend(ids)
        session.generate(32)
        cluster.worker_of(session.session_id)   # the Ray actor of its replica
        cluster.stats()

One replica per GPU when GPUs exist (num_gpus=1, model and store on it), CPU replicas otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import RequestRouterConfig

from policies.routing import RoutingPolicy, make_routing
from tiered import StoreConfig
from tiered.checked import (
    PathOrNone,
    Positive,
    PositiveNumber,
    arguments,
    bounds,
    check_some,
    checked,
    from_env,
    from_file,
    read_yaml,
    type_name,
)

from .. import saved as saved_sessions
from ..actors import start_ray
from ..saved import check_session_id
from ..step_loop import DEFAULT_MAX_SEQUENCES, DEFAULT_STEP_TOKENS
from ..trace_recorder import TraceRecorder
from .handle import ClusterSession
from .replica import SessionReplica
from .router import SessionRouter
from .table import TABLES, RoutingTable

SERVE_NAMESPACE = "serve"
DEPLOYMENT = "SessionReplica"


SHARED_MAX_IMBALANCE = 0  # sessions; prefix-affinity's default otherwise (policies.routing)


def routing_policy(name: str, shared: bool) -> RoutingPolicy:
    """The routing policy `name`. With a shared tier, prefix-affinity follows the longest prefix
    only among the least loaded replicas (SHARED_MAX_IMBALANCE): a replica that lacks a prefix
    locally reads it from the shared tier instead of computing it, and the sessions of a replica
    share its compute (one forward step at a time), so stacking them on the holder slows each of
    their steps by more than the reuse saves."""
    if name == "prefix-affinity" and shared:
        return make_routing(name, max_imbalance=SHARED_MAX_IMBALANCE)
    return make_routing(name)


def replica_deployment(workers: int, gpus: bool, cpus_per_worker: float, table_key: str, routing: str):
    """The SessionReplica deployment of `workers` replicas (one GPU each when `gpus`), routed by the
    SessionRouter over the RoutingTable registered as TABLES[table_key] in the handle's process."""
    return serve.deployment(SessionReplica, name=DEPLOYMENT).options(
        num_replicas=workers,
        ray_actor_options={"num_cpus": cpus_per_worker, "num_gpus": 1 if gpus else 0},
        max_ongoing_requests=64,
        health_check_period_s=2,
        health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter,
            request_router_kwargs={"table_key": table_key, "routing": routing},
        ),
    )


# Cluster's options that a file's `cluster:` section and TIERED_<OPTION> variables may set
# (Cluster.options), with their meanings (docs/CONFIG.md)
FILE_OPTIONS = {
    "workers": "replicas (one per GPU when there are GPUs)",
    "routing": 'policies.routing name that places new sessions ("prefix-affinity")',
    "cpus_per_worker": "CPUs each replica reserves",
    "step_tokens": "tokens one forward step of a replica computes at most (continuous batching, runtime.step_loop)",
    "max_sequences": "sessions one forward step of a replica computes at most (1: no batching)",
    "call_timeout_s": "longest a single call may take before TimeoutError",
    "failover_timeout_s": "how long a session's calls keep retrying while its replica is replaced",
}


class Cluster:
    """Starts (or joins, with `address`) Ray and deploys `workers` SessionReplicas of `model`.

    model              a model name or checkpoint path, as runtime.load_model takes it
    store_config       each replica's store (device/host tiers local to it; a disk_dir gets a
                       subdirectory per replica)
    shared_dir         a directory every node mounts: the cluster-wide shared tier (tiered.shared)
                       below each replica's local tiers, and saved sessions' manifests; a session
                       whose replica dies is rebuilt from it (and its token log) on another
    address            None: a new embedded local Ray instance (or RAY_ADDRESS); see start_ray
    num_cpus           CPUs of a new local Ray instance (None: the machine's)
    recorder           a runtime.trace_recorder.TraceRecorder every session records its turns to
                       (ClusterSession), unless open() is given another
    workers, routing, cpus_per_worker, step_tokens, max_sequences, call_timeout_s,
    failover_timeout_s: FILE_OPTIONS, which a YAML file and the environment may set too (options())
    """

    @checked
    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        workers: Positive = 2,
        store_config: StoreConfig | None = None,
        shared_dir: PathOrNone = None,
        address: str | None = None,
        *,
        routing: str = "prefix-affinity",
        dtype: str = "float32",
        cpus_per_worker: PositiveNumber = 1.0,
        num_cpus: Positive | None = None,
        step_tokens: Positive = DEFAULT_STEP_TOKENS,
        max_sequences: Positive = DEFAULT_MAX_SEQUENCES,
        call_timeout_s: PositiveNumber = 300.0,
        failover_timeout_s: PositiveNumber = 120.0,
        recorder: TraceRecorder | None = None,
    ) -> None:
        batching = {"step_tokens": step_tokens, "max_sequences": max_sequences}
        self.table = RoutingTable(routing_policy(routing, shared=shared_dir is not None))  # validates the name
        self.call_timeout_s, self.failover_timeout_s = float(call_timeout_s), float(failover_timeout_s)
        gpus = torch.cuda.device_count()
        device = "cuda" if gpus else "cpu"
        store_config = store_config or StoreConfig(device=device)
        if gpus:  # the model and the store on the replica's GPU
            store_config = dataclasses.replace(store_config, device="cuda")
        if shared_dir is not None:
            Path(shared_dir).mkdir(parents=True, exist_ok=True)
            store_config = dataclasses.replace(store_config, shared_dir=str(Path(shared_dir).resolve()))
        self.shared_dir = store_config.shared_dir
        self.block_tokens = store_config.block_tokens
        if recorder is not None:
            recorder.check_block_tokens(self.block_tokens)
        self.recorder = recorder
        self._table_key = f"tiered-{uuid.uuid4().hex[:12]}"
        self.app_name = self._table_key
        TABLES[self._table_key] = self.table
        self._closed = False
        self._actor_names: dict[str, str] = {}  # replica id -> its actor's name
        self._owns_ray = not ray.is_initialized()  # then shutdown() stops Serve and Ray too
        start_ray(address, num_cpus=num_cpus)
        serve.start(proxy_location="Disabled")
        deployment = replica_deployment(workers, gpus > 0, cpus_per_worker, self._table_key, routing)
        try:
            if gpus and workers > int(ray.cluster_resources().get("GPU", 0)):
                raise ValueError(f"workers={workers} but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} "
                                 "GPUs: one replica per GPU")
            self._handle = serve.run(deployment.bind(str(model), store_config, dtype, device, batching), name=self.app_name,
                                     route_prefix=None)
            info = self._any_replica()["model"]
        except BaseException:
            self.shutdown()
            raise
        self.fingerprint = info["fingerprint"]
        self.model_info = info

    # -- sessions -------------------------------------------------------------------------------

    @checked
    def open(self, session_id: str | None = None, *, recorder: TraceRecorder | None = None,
             **session_options) -> ClusterSession:
        """A new session (options as runtime.Session takes them); it is placed on a replica at
        its first call, by the longest cached prefix of its first tokens. `recorder`: where its
        turns are recorded (default: the cluster's recorder, if any)."""
        self._check_open()
        session_id = check_session_id(session_id or uuid.uuid4().hex)
        if self.table.home_of(session_id) is not None:
            raise ValueError(f"session {session_id!r} is already open on this cluster")
        if recorder is not None:
            recorder.check_block_tokens(self.block_tokens)
        return ClusterSession(self, session_id, session_options, recorder or self.recorder)

    def resume(self, session_id: str) -> ClusterSession:
        """A handle on the session saved (ClusterSession.save) in the shared directory; it is placed
        at its first call on the replica holding the longest prefix of it."""
        self._check_open()
        if self.shared_dir is None:
            raise ValueError("resume needs the cluster's shared_dir, where sessions are saved")
        record = saved_sessions.read(self.shared_dir, session_id)
        if record.fingerprint != self.fingerprint or record.block_tokens != self.block_tokens:
            raise ValueError(f"saved session {session_id!r} was made with another model or block size")
        session = ClusterSession(self, session_id, record.options, self.recorder)
        session.tokens = list(record.tokens)
        return session

    def worker_of(self, session_id: str):
        """The Ray actor handle of the replica hosting `session_id`; KeyError if none does."""
        replica_id = self.table.home_of(session_id)
        if replica_id is None:
            raise KeyError(f"session {session_id!r} is not hosted by any replica")
        return ray.get_actor(self._actor_names[replica_id], namespace=SERVE_NAMESPACE)

    def stats(self) -> dict:
        """Per replica (by Serve replica id): actor name, node, sessions, the store's statistics
        (tier occupancy, hits and misses), and the routing table's view (sessions = load)."""
        self._check_open()
        out = {}
        for replica_id, routed in self.table.snapshot().items():
            described = self.call("describe", replica=replica_id)
            self._actor_names[replica_id] = described["actor_name"]
            out[replica_id] = {**described, "routed": routed}
        return {"replicas": out, "workers": len(out)}

    # -- calls (used by ClusterSession) ---------------------------------------------------------

    def call(self, method: str, *args, **kwargs):
        """Call `method` of the replica the router picks, blocking up to call_timeout_s."""
        self._check_open()
        with input_errors_unwrapped():
            return getattr(self._handle, method).remote(*args, **kwargs).result(timeout_s=self.call_timeout_s)

    def stream(self, session_id: str, max_new_tokens: int, temperature: float, seed: int | None,
               top_p: float = 1.0) -> Iterator[int]:
        self._check_open()
        handle = self._handle.options(method_name="stream", stream=True)
        with input_errors_unwrapped():
            yield from handle.remote(session_id, max_new_tokens, temperature, seed, top_p)

    def adopt(self, session_id: str, options: dict, tokens: list[int], block_hashes: list[str]) -> dict:
        identity = self.call("adopt", session_id, options, tokens, block_hashes=block_hashes)
        self._actor_names[identity["replica_id"]] = identity["actor_name"]
        return identity

    # -- lifetime -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Delete the application (replicas close their stores); Serve and Ray stop too when this
        cluster started Ray, else they stay up. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if ray.is_initialized():
                serve.delete(self.app_name)
        finally:
            TABLES.pop(self._table_key, None)
            if self._owns_ray and ray.is_initialized():
                serve.shutdown()
                ray.shutdown()

    @staticmethod
    def reference() -> str:
        """The Markdown table of FILE_OPTIONS (docs/CONFIG.md)."""
        hints = arguments(Cluster.__init__, FILE_OPTIONS)
        defaults = inspect.signature(Cluster.__init__).parameters
        lines = ["## Cluster options", "",
                 "`Cluster(...)`'s options that the `cluster:` section of a YAML file (`tiered run --config FILE`,",
                 "next to its `store:` section) and `TIERED_<OPTION>` variables may set (`Cluster.options(path)`);",
                 "options given on the command line override the environment, which overrides the file.", "",
                 "| option | environment | type | allowed | default | meaning |", "|---|---|---|---|---|---|"]
        for name, meaning in FILE_OPTIONS.items():
            cells = [f"`{name}`", f"`TIERED_{name.upper()}`", type_name(hints[name]), bounds(hints[name]) or "any",
                     f"`{defaults[name].default!r}`", meaning]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    @staticmethod
    def options(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Cluster options (FILE_OPTIONS) from the `cluster:` section of the YAML file at `path` (the
        file tiered.StoreConfig.load reads its `store:` section from), then from TIERED_<OPTION>
        variables of `env` (default: os.environ), such as TIERED_WORKERS=2; checked as the constructor checks them."""
        section = None
        if path is not None:
            loaded = read_yaml(path)
            section = loaded.get("cluster") if isinstance(loaded, dict) else None
        values = from_file(section, FILE_OPTIONS, f"{path} (cluster)")
        values.update(from_env(arguments(Cluster.__init__, FILE_OPTIONS), os.environ if env is None else env))
        check_some(Cluster.__init__, values)
        return values

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _any_replica(self) -> dict:
        identity = self._handle.describe.remote().result(timeout_s=self.call_timeout_s)
        self._actor_names[identity["replica_id"]] = identity["actor_name"]
        return identity

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cluster is shut down")


@contextlib.contextmanager
def input_errors_unwrapped():
    """A replica's ValueError, TypeError or KeyError (bad input, a missing session) reaches the
    caller as itself, not wrapped in Ray's RayTaskError with the remote traceback in its message."""
    try:
        yield
    except RayTaskError as error:
        if isinstance(error.cause, (ValueError, TypeError, KeyError)):
            raise error.cause from None
        raise
