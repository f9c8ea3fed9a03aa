"""`tiered serve`: an OpenAI-compatible HTTP server (chat and completions, streaming, cached-token
usage, API keys, per-tenant cache salts) on the cluster runtime, on an embedded local Ray instance
(or the cluster at --address / RAY_ADDRESS). Runs until interrupted."""

from __future__ import annotations

import argparse
import signal
import threading

from pydantic import ValidationError

from tiered import CODECS


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="serve the model over an OpenAI-compatible HTTP API",
                        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registered name, .gguf file or HF directory")
    parser.add_argument("--served-model-name", default=None, help="the id clients send as `model` (default: --model)")
    parser.add_argument("--workers", type=int, default=1, help="replicas (one per GPU when there are GPUs)")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device-mib", type=int, default=64, help="device tier capacity of each replica")
    parser.add_argument("--host-mib", type=int, default=256, help="host tier capacity of each replica")
    parser.add_argument("--disk-mib", type=int, default=1024, help="disk tier capacity of each replica")
    parser.add_argument("--disk-dir", default=None, help="disk tier directory (default: none)")
    parser.add_argument("--host-codec", default="int8", help=f"one of {sorted(CODECS)}, or a spec such as int4:g32")
    parser.add_argument("--disk-codec", default="int8", help="as --host-codec")
    parser.add_argument("--eviction", default="lru")
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per KV block")
    parser.add_argument("--shared-dir", default=None, help="the cluster's shared tier: a directory every node mounts")
    parser.add_argument("--api-key", action="append", default=None,
                        help="require 'Authorization: Bearer KEY' (repeat for more tenants; default: $TIERED_API_KEY)")
    parser.add_argument("--no-reuse", action="store_true", help="never reuse cached prefixes (a benchmark baseline)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a request that sets none")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..serve.settings import ServeSettings

    try:
        settings = ServeSettings(
            model=args.model, served_model_name=args.served_model_name, workers=args.workers,
            device_mib=args.device_mib, host_mib=args.host_mib, disk_mib=args.disk_mib, disk_dir=args.disk_dir,
            host_codec=args.host_codec, disk_codec=args.disk_codec, eviction=args.eviction,
            block_tokens=args.block_tokens, shared_dir=args.shared_dir, api_keys=args.api_key or (),
            no_reuse=args.no_reuse, default_max_tokens=args.max_tokens)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first.get("loc") else "an option"
        print(f"tiered serve: {option}: {first['msg']} (got {first.get('input')!r})")
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
