"""`tiered run`: the main job. Two sessions read one long document and ask questions about it over
several turns, at the same time, on a local cluster of two replicas (an embedded Ray instance);
the second reuses the blocks the first computed. Then where each ran, and what moved where."""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path

from rich.table import Table

from policies import EVICTION, IMPORTANCE, PREFETCH
from tiered import CODECS, StoreConfig

from ..model import load_header
from ..model.tokenizer import Tokenizer
from . import checks
from .checks import UsageError, positive_int
from .tables import print_table

QUESTIONS = (
    "Who is speaking at the start of this text, and what are they about to do?",
    "Why are the citizens angry with Caius Marcius?",
    "What does Menenius try to do when he meets the citizens?",
)
FOLLOW_UP = "Summarize what we discussed in one sentence."
# the store of each replica, unless --config, TIERED_* variables or options say otherwise
STORE_DEFAULTS = {"device_bytes": 64 << 20, "host_bytes": 32 << 20, "disk_bytes": 1 << 30, "host_codec": "int8",
                  "disk_codec": "int8", "eviction": "lru"}
DEFAULT_WORKERS = 2  # replicas of the local cluster
SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives you, briefly."


def register(add_parser, name: str) -> None:
    parser = add_parser(name, help="run a long-context multi-turn session (the main job)",
                        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", type=checks.model,
                        help="registered name, .gguf file or HF directory")
    parser.add_argument("--document", type=checks.readable_file, default=None,
                        help="text file (default: the shipped Shakespeare)")
    parser.add_argument("--context-tokens", type=positive_int, default=1024, help="tokens of the document to read")
    parser.add_argument("--question", action="append", default=None, help="a question (repeat for more turns)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per turn")
    parser.add_argument("--chunk-tokens", type=positive_int, default=256, help="prefill chunk size")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help=f"replicas of the local cluster (default {DEFAULT_WORKERS}, or --config's cluster section)")
    parser.add_argument("--sessions", type=positive_int, default=2, help="concurrent sessions over the document")
    parser.add_argument("--mode", choices=("exact", "sparse"), default="exact")
    parser.add_argument("--budget-tokens", type=positive_int, default=None, help="sparse mode: tokens per layer and step")
    parser.add_argument("--importance", default="quest", type=checks.one_of(IMPORTANCE))
    parser.add_argument("--prefetch", default="none", type=checks.one_of(PREFETCH))
    parser.add_argument("--eviction", default=None, type=checks.one_of(EVICTION),
                        help=f"eviction policy of every tier (default {STORE_DEFAULTS['eviction']})")
    parser.add_argument("--config", type=checks.readable_file, default=None, metavar="FILE",
                        help="options in YAML (docs/CONFIG.md): StoreConfig's under store:, over run's own "
                             "defaults, and the cluster's (workers, step_tokens, ...) under cluster:; TIERED_* "
                             "variables override the file, the options below override both")
    parser.add_argument("--device-mib", type=positive_int, default=None,
                        help=f"device tier capacity per replica (default {STORE_DEFAULTS['device_bytes'] >> 20})")
    parser.add_argument("--host-mib", type=positive_int, default=None,
                        help=f"host tier capacity per replica (default {STORE_DEFAULTS['host_bytes'] >> 20})")
    parser.add_argument("--disk-mib", type=positive_int, default=None,
                        help=f"disk tier capacity per replica (default {STORE_DEFAULTS['disk_bytes'] >> 20})")
    parser.add_argument("--disk-dir", type=checks.creatable_dir, default=None,
                        help="where sessions are saved (the cluster's shared tier; with --no-ray, the disk tier); "
                             "default: a temporary directory, nothing saved")
    parser.add_argument("--host-codec", default=None, type=checks.codec,
                        help=f"one of {sorted(CODECS)}, or a spec such as int4:g32 "
                             f"(default {STORE_DEFAULTS['host_codec']})")
    parser.add_argument("--disk-codec", default=None, type=checks.codec,
                        help=f"as --host-codec (default {STORE_DEFAULTS['disk_codec']})")
    parser.add_argument("--resume", metavar="ID", default=None,
                        help="continue a session saved in --disk-dir (`tiered sessions DIR` lists them)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--no-ray", action="store_true", help="one session in this process instead of the cluster")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.resume is not None and args.disk_dir is None:
        raise UsageError("--resume", "needs --disk-dir, the directory the session was saved in")
    cluster_options = _checked_options(args)
    document = args.document or Path(str(resources.files("runtime") / "data" / "tinyshakespeare.txt"))
    questions = args.question or ([FOLLOW_UP] if args.resume else list(QUESTIONS))
    config, tokenizer = load_header(args.model)
    text = document_text(tokenizer, document, args.context_tokens)
    if args.resume is None:  # a resumed session's length is known to its replica, which checks it
        needed = sum(len(turn_prompt(tokenizer, text, q, turn == 0)) + args.max_new_tokens for turn, q in enumerate(questions))
        if needed > config.max_position_embeddings:
            raise UsageError("--context-tokens", f"{args.context_tokens} with {len(questions)} questions of "
                             f"{args.max_new_tokens} answer tokens needs {needed} tokens; {args.model} holds "
                             f"{config.max_position_embeddings}")
    with tempfile.TemporaryDirectory(prefix="tiered-run-") as scratch:
        if args.no_ray:
            return _run_in_process(args, text, questions, scratch)
        from .run_cluster import run_on_cluster

        return run_on_cluster(args, tokenizer, text, questions, scratch, cluster_options)


def _checked_options(args: argparse.Namespace) -> dict:
    """The cluster's options (none with --no-ray): DEFAULT_WORKERS, then --config's and the TIERED_*
    variables', then --workers; and the store's checked too, before any work. A bad one is a usage
    error naming where it came from."""
    try:
        store_config(args, Path(tempfile.gettempdir()))  # made again later, over the run's scratch directory
        if args.no_ray:
            return {}
        from ..cluster import Cluster

        options = {"workers": DEFAULT_WORKERS, **Cluster.options(args.config)}
    except (ValueError, TypeError) as error:
        raise UsageError("--config" if args.config else "TIERED_* variables", " ".join(str(error).split())) from None
    if args.workers is not None:
        options["workers"] = args.workers
    return options


def store_config(args: argparse.Namespace, disk_dir: Path) -> StoreConfig:
    """Run's defaults, then --config's file, then TIERED_* variables, then the options given; the
    disk tier's directory is the run's."""
    given = {"device_bytes": _bytes(args.device_mib), "host_bytes": _bytes(args.host_mib),
             "disk_bytes": _bytes(args.disk_mib), "host_codec": args.host_codec, "disk_codec": args.disk_codec,
             "eviction": args.eviction}
    overrides = {name: value for name, value in given.items() if value is not None}
    return StoreConfig.load(args.config, base=STORE_DEFAULTS, **overrides, disk_dir=str(disk_dir))


def _bytes(mib: int | None) -> int | None:
    return None if mib is None else mib << 20


def session_options(args: argparse.Namespace) -> dict:
    return {"mode": args.mode, "budget_tokens": args.budget_tokens, "importance": args.importance,
            "prefetch": args.prefetch, "chunk_tokens": args.chunk_tokens}


def document_text(tokenizer: Tokenizer, document: Path, tokens: int) -> str:
    """The first `tokens` tokens of `document`, as text."""
    return tokenizer.decode(tokenizer.encode(document.read_text(encoding="utf-8")[: tokens * 8])[:tokens])


def turn_prompt(tokenizer: Tokenizer, text: str, question: str, first: bool) -> list[int]:
    """The tokens of one turn: the system prompt, document and question on the first turn; after
    that the question, closing the previous answer (cut before its end-of-turn marker) first."""
    if first:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{text}\n\n{question}"}]
        return tokenizer.apply_chat_template(messages)
    return tokenizer.encode("<|im_end|>\n") + tokenizer.apply_chat_template([{"role": "user", "content": question}])


def tier_table(store: dict, title: str | None = None) -> Table:
    """A store's tiers (TieredStore.stats()): blocks, occupancy, traffic, hits, evictions."""
    table = Table(box=None, header_style="bold", title=title, title_justify="left")
    for column in ("tier", "blocks", "used MiB", "cap MiB", "in MiB", "out MiB", "hits", "hit rate", "evicted"):
        table.add_column(column, justify="right")
    reads = sum(tier["hits"] for tier in store["tiers"].values())
    for name, tier in store["tiers"].items():
        rate = tier["hits"] / reads if reads else 0.0
        table.add_row(name, str(tier["blocks"]), f"{tier['used_bytes'] / 2**20:.1f}", f"{tier['capacity_bytes'] / 2**20:.0f}",
                      f"{tier['bytes_in'] / 2**20:.1f}", f"{tier['bytes_out'] / 2**20:.1f}", str(tier["hits"]),
                      f"{rate:.1%}", str(tier["evictions"]))
    return table


def _run_in_process(args: argparse.Namespace, text: str, questions: list[str], scratch: str) -> int:
    """One session on a SessionWorker in this process; it streams each answer as it comes."""
    from ..worker import SessionWorker

    worker = SessionWorker(args.model, store_config(args, args.disk_dir or Path(scratch) / "kv"))
    try:
        if args.resume is not None:
            session_id = args.resume
            print(f"resuming session {session_id} ({worker.resume(session_id)} tokens)")
        else:
            session_id = worker.open(uuid.uuid4().hex, **session_options(args))
        tokenizer = worker.model.tokenizer
        for turn, question in enumerate(questions):
            prompt = turn_prompt(tokenizer, text, question, first=turn == 0 and args.resume is None)
            start_s = time.perf_counter()
            worker.extend(session_id, prompt)
            prefill_s = time.perf_counter() - start_s
            print(f"\n[turn {turn + 1}] {question}")
            print("  > ", end="", flush=True)
            answer: list[int] = []
            start_s = time.perf_counter()
            for token in worker.stream(session_id, args.max_new_tokens):
                answer.append(token)
                print(tokenizer.decode([token]), end="", flush=True)
            decode_s = time.perf_counter() - start_s
            print(f"\n  ({len(prompt)} prompt tokens at {len(prompt) / prefill_s:.0f} tok/s, "
                  f"{len(answer)} answer tokens at {len(answer) / max(decode_s, 1e-9):.1f} tok/s)")
        stats = worker.stats(session_id)
        print(f"\nsession: {stats['tokens']} tokens; prefill {stats['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {stats['decode_tokens_per_s']:.1f} tok/s; reused {stats['reused_tokens']}, computed "
              f"{stats['computed_tokens']}, recomputed {stats['recomputed_tokens']} tokens")
        print_table(tier_table(stats["store"]))
        store = stats["store"]
        print(f"written through to disk: {store['write_through_blocks']} sealed blocks "
              f"({store['write_through_bytes'] / 2**20:.1f} MiB)")
        if args.disk_dir is not None:
            worker.save(session_id)
            print(f"\nsaved; continue with: tiered run --no-ray --resume {session_id} --disk-dir {args.disk_dir}")
    finally:
        worker.shutdown()
    return 0
