"""`tiered serve`: an OpenAI-compatible HTTP server (chat and completions, streaming, cached-token
usage, API keys, per-tenant cache salts) on the cluster runtime, on an embedded local Ray instance
(or the cluster at --address / RAY_ADDRESS). Runs until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from pydantic import ValidationError

from tiered import CODECS


# option dest -> ServeSettings field (the rest have the field's name)
FIELDS = {"api_key": "api_keys", "max_tokens": "default_max_tokens"}
SETTING_OPTIONS = (
    ("--model", str, "registered name, .gguf file or HF directory"),
    ("--served-model-name", str, "the id clients send as `model` (default: --model)"),
    ("--workers", int, "replicas (one per GPU when there are GPUs)"),
    ("--device-mib", int, "device tier capacity of each replica"),
    ("--host-mib", int, "host tier capacity of each replica"),
    ("--disk-mib", int, "disk tier capacity of each replica (with --disk-dir)"),
    ("--disk-dir", str, "disk tier directory, a subdirectory per replica (default: no disk tier)"),
    ("--host-codec", str, f"one of {sorted(CODECS)}, or a spec such as int4:g32"),
    ("--disk-codec", str, "as --host-codec"),
    ("--eviction", str, "eviction policy name"),
    ("--block-tokens", int, "tokens per KV block"),
    ("--shared-dir", str, "the cluster's shared tier: a directory every node mounts"),
    ("--max-tokens", int, "max_tokens of a request that sets none"),
    ("--step-tokens", int, "tokens one batched forward step of a replica computes at most"),
    ("--max-sequences", int, "conversations one step of a replica computes at most (1: no batching)"),
)


def register(add_parser, name: str) -> None:
    from ..serve.settings import ServeSettings

    parser = add_parser(name, help="serve the model over an OpenAI-compatible HTTP API", description=__doc__)
    for option, kind, text in SETTING_OPTIONS:
        dest = option[2:].replace("-", "_")
        default = ServeSettings.model_fields[FIELDS.get(dest, dest)].default
        parser.add_argument(option, type=kind, default=None, help=text + ("" if default is None else f" ({default})"))
    parser.add_argument("--api-key", action="append", default=None,
                        help="require 'Authorization: Bearer KEY' (repeat for more tenants; default: $TIERED_API_KEY)")
    parser.add_argument("--no-reuse", action="store_true", default=None,
                        help="never reuse cached prefixes (a benchmark baseline)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML of runtime.serve.settings.ServeSettings fields; options given here override it")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.set_defaults(func=main)


def settings_of(args: argparse.Namespace):
    """The ServeSettings of the command line: --config's fields, then TIERED_<SETTING> variables,
    then the options given. Raises ValueError with one line naming the option (or the file's field,
    or the variable) when one is wrong."""
    from ..serve.settings import ServeSettings

    options = {opt[2:].replace("-", "_") for opt, _, _ in SETTING_OPTIONS} | {"api_key", "no_reuse"}
    given = {FIELDS.get(dest, dest): getattr(args, dest) for dest in options if getattr(args, dest) is not None}
    try:
        return ServeSettings.load(args.config, **given)
    except ValueError as error:
        if not isinstance(error, ValidationError):
            raise ValueError(f"--config: {error}") from None
        first = error.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        dest = next((d for d, f in FIELDS.items() if f == field), field)
        if field in given:
            where = f"--{dest.replace('_', '-')}"
        elif ServeSettings.env_name(field) in os.environ:
            where = ServeSettings.env_name(field)
        else:
            where = f"--config: {field}"
        raise ValueError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_of(args)
    except ValueError as error:
        print(f"tiered serve: {error}")
        return 2
    if not 0 < args.port < 65536:
        print(f"tiered serve: --port must be in 1..65535, got {args.port}")
        return 2
    from ray import serve

    from ..actors import start_ray
    from ..serve.app import build

    print("starting Ray and the replicas ...", flush=True)
    start_ray(args.address, num_cpus=args.num_cpus)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
        serve.run(build(settings.model_dump()), name="tiered", route_prefix="/")
        auth = f", {len(settings.api_keys)} API key(s)" if settings.api_keys else ""
        print(f"serving {settings.model_id!r} on http://{args.host}:{args.port}/v1 "
              f"({settings.workers} replica(s){auth}{', no prefix reuse' if settings.no_reuse else ''})", flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    return 0
