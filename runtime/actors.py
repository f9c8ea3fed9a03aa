"""Ray actors: thin shells around the plain worker classes. The only module that imports Ray."""

from __future__ import annotations

from .worker import SessionWorker


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start an embedded local Ray instance (no cluster address), unless one is running."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def session_worker_actor(**options):
    """The SessionWorker class as a Ray actor class; `options` go to `.options()` (num_cpus, ...)."""
    import ray

    return ray.remote(SessionWorker).options(**options)


class ActorHandle:
    """Calls a Ray actor's methods as if it were the plain object (blocking), streams included."""

    def __init__(self, actor) -> None:
        self._actor = actor

    def __getattr__(self, name: str):
        import ray

        method = getattr(self._actor, name)

        def call(*args, **kwargs):
            if name == "stream":
                return (ray.get(ref) for ref in method.options(num_returns="streaming").remote(*args, **kwargs))
            return ray.get(method.remote(*args, **kwargs))

        return call
