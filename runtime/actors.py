"""How this process starts or joins Ray.

With runtime/cluster/ (the session workers as Ray Serve replicas), the only modules that import Ray.

Starting Ray: `ray.init()` with no address reads `<temp>/ray/ray_current_cluster` and tries to
join the cluster named there; when that cluster died uncleanly the call hangs. So the embedded
default here always starts its own instance (`address="local"`); joining is explicit (an
`address`, or the `RAY_ADDRESS` environment variable), and a cluster whose address does not
answer within `timeout_s` is a ConnectionError that names the address.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from tiered.checked import Positive, PositiveNumber, checked

DEFAULT_JOIN_TIMEOUT_S = 15.0


@checked
def start_ray(
    address: str | None = None, num_cpus: Positive | None = None, timeout_s: PositiveNumber = DEFAULT_JOIN_TIMEOUT_S,
    **init_options,
) -> str:
    """Start an embedded Ray instance, or join the cluster at `address`; no-op if Ray is running.

    address     None: `RAY_ADDRESS` if set, else a new local instance; "local": a new local
                instance; "auto": the cluster named in Ray's current-cluster file; "host:port"
                or "ray://host:port": that cluster
    num_cpus    CPUs of a new local instance (ignored when joining)
    timeout_s   how long a cluster's address may take to answer before ConnectionError
    Returns the address Ray runs at (the GCS address).
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    options.update(init_options)
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, **options)
    else:
        probe_cluster(address, timeout_s)
        ray.init(address=address, **options)
    return ray.get_runtime_context().gcs_address


def probe_cluster(address: str, timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> str:
    """The "host:port" of the cluster at `address` once its port accepts a connection within
    `timeout_s`; ConnectionError naming the address otherwise. "auto" is resolved from Ray's
    current-cluster file (ConnectionError when there is none)."""
    target = _resolve(address)
    split = urlsplit(target if "://" in target else f"ray://{target}")
    if split.hostname is None or split.port is None:
        raise ValueError(f"a Ray cluster address is 'host:port' or 'ray://host:port', got {address!r}")
    try:
        with socket.create_connection((split.hostname, split.port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConnectionError(
            f"the Ray cluster at {target!r}{'' if target == address else f' (from {address!r})'} did not answer "
            f"within {timeout_s:g} s ({err}); start it, fix the address, or leave the address out to start a "
            f"local instance"
        ) from None
    return f"{split.hostname}:{split.port}"


def current_cluster_file() -> Path:
    """Where Ray records the cluster `ray.init()` would join by default (RAY_TMPDIR or the temp dir)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _resolve(address: str) -> str:
    if address != "auto":
        return address
    path = current_cluster_file()
    try:
        recorded = path.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConnectionError(f"address='auto' but no Ray cluster is recorded in {path}") from None
    if not recorded:
        raise ConnectionError(f"address='auto' but {path} is empty")
    return recorded

