"""`tiered run`: the main job. A long document, questions about it over several turns, the KV cache
in a tiered store hosted by a worker on an embedded local Ray instance; then what moved where."""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path

from rich.table import Table
from tqdm import tqdm

from tiered import CODECS, StoreConfig, make_codec

from .tables import print_table

QUESTIONS = (
    "Who is speaking at the start of this text, and what are they about to do?",
    "Why are the citizens angry with Caius Marcius?",
    "What does Menenius try to do when he meets the citizens?",
)
FOLLOW_UP = "Summarize what we discussed in one sentence."
SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives you, briefly."


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="run a long-context multi-turn session (the main job)",
                        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registered name, .gguf file or HF directory")
    parser.add_argument("--document", type=Path, default=None, help="text file (default: the shipped Shakespeare)")
    parser.add_argument("--context-tokens", type=int, default=2048, help="tokens of the document to read")
    parser.add_argument("--question", action="append", default=None, help="a question (repeat for more turns)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="prefill chunk size")
    parser.add_argument("--mode", choices=("exact", "sparse"), default="exact")
    parser.add_argument("--budget-tokens", type=int, default=None, help="sparse mode: tokens per layer and step")
    parser.add_argument("--importance", default="quest")
    parser.add_argument("--prefetch", default="none")
    parser.add_argument("--eviction", default="lru")
    parser.add_argument("--device-mib", type=int, default=24, help="device tier capacity")
    parser.add_argument("--host-mib", type=int, default=16, help="host tier capacity")
    parser.add_argument("--disk-mib", type=int, default=1024, help="disk tier capacity")
    parser.add_argument("--disk-dir", type=Path, default=None,
                        help="disk tier directory; the session is saved there (default: a temporary one, not saved)")
    parser.add_argument("--host-codec", default="int8", type=_codec, help=f"one of {sorted(CODECS)}, or a spec such as int4:g32")
    parser.add_argument("--disk-codec", default="int8", type=_codec, help="as --host-codec")
    parser.add_argument("--resume", metavar="ID", default=None,
                        help="continue a session saved in --disk-dir (`tiered sessions DIR` lists them)")
    parser.add_argument("--no-ray", action="store_true", help="host the session in this process instead of a Ray worker")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.resume is not None and args.disk_dir is None:
        print("tiered run: --resume needs --disk-dir, the directory the session was saved in")
        return 2
    document = args.document or Path(str(resources.files("runtime") / "data" / "tinyshakespeare.txt"))
    questions = args.question or ([FOLLOW_UP] if args.resume else list(QUESTIONS))
    with tempfile.TemporaryDirectory(prefix="tiered-run-") as scratch:
        config = StoreConfig(
            device_bytes=args.device_mib << 20, host_bytes=args.host_mib << 20,
            disk_dir=str(args.disk_dir or Path(scratch) / "kv"), disk_bytes=args.disk_mib << 20,
            host_codec=args.host_codec, disk_codec=args.disk_codec, eviction=args.eviction,
        )
        worker = _start_worker(args, config)
        try:
            if args.resume is not None:
                session_id = args.resume
                print(f"resuming session {session_id} ({worker.resume(session_id)} tokens)")
            else:
                session_id = uuid.uuid4().hex
                worker.open(session_id, mode=args.mode, budget_tokens=args.budget_tokens,
                            importance=args.importance, prefetch=args.prefetch)
            _converse(worker, session_id, document, questions, args, resumed=args.resume is not None)
            _report(worker.stats(session_id))
            if args.disk_dir is not None:
                worker.save(session_id)
                print(f"\nsaved; continue with: tiered run --resume {session_id} --disk-dir {args.disk_dir}")
        finally:
            worker.shutdown()
    return 0


def _codec(spec: str) -> str:
    try:
        make_codec(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def _start_worker(args: argparse.Namespace, config: StoreConfig):
    if args.no_ray:
        from ..worker import SessionWorker

        return SessionWorker(args.model, config)
    from ..actors import ActorHandle, session_worker_actor, start_local_ray

    print("starting an embedded local Ray instance ...", flush=True)
    start_local_ray()
    return ActorHandle(session_worker_actor().remote(args.model, config))


def _converse(worker, session_id: str, document: Path, questions: list[str], args: argparse.Namespace,
              resumed: bool = False) -> None:
    text_ids = worker.encode(document.read_text(encoding="utf-8")[: args.context_tokens * 8])[: args.context_tokens]
    text = worker.decode(text_ids)
    for turn, question in enumerate(questions):
        first = turn == 0 and not resumed
        content = f"{text}\n\n{question}" if first else question
        messages = [{"role": "system", "content": SYSTEM}] if first else []
        prompt = worker.chat_tokens(messages + [{"role": "user", "content": content}])
        if not first:  # the previous answer stopped before its end-of-turn marker: close it first
            prompt = worker.encode("<|im_end|>\n") + prompt
        start_s = time.perf_counter()
        with tqdm(total=len(prompt), desc=f"turn {turn + 1}: reading", unit="tok", leave=False) as bar:
            for i in range(0, len(prompt), args.chunk_tokens):
                worker.extend(session_id, prompt[i : i + args.chunk_tokens])
                bar.update(min(args.chunk_tokens, len(prompt) - i))
        prefill_s = time.perf_counter() - start_s
        print(f"\n[turn {turn + 1}] {question}")
        print("  > ", end="", flush=True)
        answer: list[int] = []
        start_s = time.perf_counter()
        for token in worker.stream(session_id, args.max_new_tokens):
            answer.append(token)
            print(worker.decode([token]), end="", flush=True)
        decode_s = time.perf_counter() - start_s
        print(f"\n  ({len(prompt)} prompt tokens at {len(prompt) / prefill_s:.0f} tok/s, "
              f"{len(answer)} answer tokens at {len(answer) / max(decode_s, 1e-9):.1f} tok/s)")


def _report(stats: dict) -> None:
    store = stats["store"]
    print(f"\nsession: {stats['tokens']} tokens; prefill {stats['prefill_tokens_per_s']:.0f} tok/s, "
          f"decode {stats['decode_tokens_per_s']:.1f} tok/s; reused {stats['reused_tokens']}, computed "
          f"{stats['computed_tokens']}, recomputed {stats['recomputed_tokens']} tokens")
    table = Table(box=None, header_style="bold")
    for column in ("tier", "blocks", "used MiB", "cap MiB", "in MiB", "out MiB", "hits", "hit rate", "evicted"):
        table.add_column(column, justify="right")
    reads = sum(tier["hits"] for tier in store["tiers"].values())
    for name, tier in store["tiers"].items():
        rate = tier["hits"] / reads if reads else 0.0
        table.add_row(name, str(tier["blocks"]), f"{tier['used_bytes'] / 2**20:.1f}", f"{tier['capacity_bytes'] / 2**20:.0f}",
                      f"{tier['bytes_in'] / 2**20:.1f}", f"{tier['bytes_out'] / 2**20:.1f}", str(tier["hits"]),
                      f"{rate:.1%}", str(tier["evictions"]))
    print_table(table)
    print(f"written through to disk: {store['write_through_blocks']} sealed blocks "
          f"({store['write_through_bytes'] / 2**20:.1f} MiB)")
