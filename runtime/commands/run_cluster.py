"""The main job on a local cluster: `--sessions` conversations over one document on `--workers`
replicas (runtime.Cluster), the first reading the document alone, then all of them at once.

The first session computes the document's blocks; the others find them by content (on the
replica the router sends them to, or in the shared tier) and compute only what is theirs. Answers
are printed a turn at a time as each session finishes one, then where each session ran, what it
reused, and each replica's tiers.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

from ..model.tokenizer import Tokenizer
from .run import session_options, store_config, tier_table, turn_prompt
from .tables import print_table


def run_on_cluster(args: argparse.Namespace, tokenizer: Tokenizer, text: str, questions: list[str], scratch: str,
                   options: dict) -> int:
    """The conversation on a Cluster made with `options` (its FILE_OPTIONS: run._checked_options)."""
    from ..cluster import Cluster

    # the replicas' own disk tiers are caches, in scratch space; what outlives the run (sealed
    # blocks, saved sessions) is in the shared directory
    shared_dir = args.disk_dir or Path(scratch) / "shared"
    where = f"the Ray cluster at {args.address}" if args.address else "a local Ray cluster"
    config = store_config(args, Path(scratch) / "kv")
    print(f"starting {where} with {options['workers']} replicas of {args.model} ...", flush=True)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines would bury the answers
    with Cluster(model=args.model, store_config=config, shared_dir=shared_dir, address=args.address,
                 **options) as cluster:
        if args.resume is not None:
            sessions = [cluster.resume(args.resume)]
            print(f"resuming session {args.resume} ({len(sessions[0].tokens)} tokens)")
        else:
            sessions = [cluster.open(**session_options(args)) for _ in range(args.sessions)]
        names = [chr(ord("A") + k) if k < 26 else str(k) for k in range(len(sessions))]
        printer = _Printer(tokenizer)
        first = args.resume is None
        # each session asks the questions in its own order; the first reads the document alone
        asked = [questions[k % len(questions):] + questions[: k % len(questions)] for k in range(len(sessions))]
        reused = [0] * len(sessions)  # each session's reused tokens after its last turn
        reused[0] = _turn(sessions[0], names[0], 0, tokenizer, text, asked[0][0], first, args.max_new_tokens,
                          printer, 0)

        def converse(k: int) -> None:
            for turn in range(1 if k == 0 else 0, len(asked[k])):
                reused[k] = _turn(sessions[k], names[k], turn, tokenizer, text, asked[k][turn], first and turn == 0,
                                  args.max_new_tokens, printer, reused[k])

        with ThreadPoolExecutor(len(sessions)) as pool:
            for done in [pool.submit(converse, k) for k in range(len(sessions))]:
                done.result()
        _report(cluster, sessions, names)
        if args.disk_dir is not None:
            for session in sessions:
                session.save()
                print(f"saved; continue with: tiered run --resume {session.session_id} --disk-dir {args.disk_dir}")
        for session in sessions:
            session.close()
    return 0


class _Printer:
    """Prints a whole turn at once, so concurrent sessions' turns do not interleave."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def turn(self, name: str, turn: int, question: str, answer: list[int], line: str) -> None:
        with self._lock:
            print(f"\n[{name} · turn {turn + 1}] {question}")
            print(f"  > {self.tokenizer.decode(answer)}")
            print(f"  ({line})", flush=True)


def _turn(session, name: str, turn: int, tokenizer: Tokenizer, text: str, question: str, first: bool,
          max_new_tokens: int, printer: _Printer, reused_before: int) -> int:
    """One turn of `session`, printed; returns the session's reused tokens after it."""
    prompt = turn_prompt(tokenizer, text, question, first)
    start_s = time.perf_counter()
    session.extend(prompt)
    tokens = session.stream(max_new_tokens)
    answer = [token for token in [next(tokens, None)] if token is not None]
    first_token_s = time.perf_counter() - start_s
    answer += list(tokens)
    decode_s = time.perf_counter() - start_s - first_token_s
    stats = session.stats()
    rate = (len(answer) - 1) / decode_s if len(answer) > 1 and decode_s > 0 else 0.0
    printer.turn(name, turn, question, answer,
                 f"{len(prompt)} prompt tokens, {stats['reused_tokens'] - reused_before} of them reused; first token "
                 f"after {first_token_s:.1f} s; {len(answer)} answer tokens at {rate:.1f} tok/s; replica "
                 f"{_short(stats['replica_id'])}")
    return stats["reused_tokens"]


def _report(cluster, sessions: list, names: list[str]) -> None:
    table = Table(box=None, header_style="bold", title="\nsessions", title_justify="left")
    for column in ("session", "replica", "node", "tokens", "reused", "computed", "recomputed", "prefill tok/s",
                   "decode tok/s", "failovers"):
        table.add_column(column, justify="right")
    for name, session in zip(names, sessions):
        stats = session.stats()
        table.add_row(name, _short(stats["replica_id"]), stats["node_id"][:8], str(stats["tokens"]),
                      str(stats["reused_tokens"]), str(stats["computed_tokens"]), str(stats["recomputed_tokens"]),
                      f"{stats['prefill_tokens_per_s']:.0f}", f"{stats['decode_tokens_per_s']:.1f}",
                      str(stats["failovers"]))
    print_table(table)
    for replica_id, replica in cluster.stats()["replicas"].items():
        print_table(tier_table(replica["store"], title=f"\nreplica {_short(replica_id)} "
                                                       f"({len(replica['sessions'])} sessions)"))


def _short(replica_id: str) -> str:
    """A replica's short name: the last part of Serve's full replica id."""
    return replica_id.rsplit("#", 1)[-1]
