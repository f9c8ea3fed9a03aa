"""The cluster on this machine: aggregate tokens/s and time to first token (TTFT) per turn of
concurrent multi-turn conversations, prefix- and session-aware routing against round-robin, for 1
and 2 replicas; and failover time (ray.kill of a session's replica -> its next token).

Each conversation: a document and a question, then --turns - 1 more questions, --new-tokens
generated greedily after each; conversations run concurrently (one thread each), in lockstep: every
conversation starts turn t when all have finished turn t - 1, so each turn's TTFT is measured under
the same load in both routings. The documents are read once before the conversations start, so new
sessions find them cached somewhere.

    routing          how a turn reaches a replica
    prefix-affinity  ours: a session's turns go to its replica (runtime.Cluster's handles); a new
                     session goes where the longest prefix of its tokens is cached; shared tier on
    round-robin      what a plain load balancer does in front of prefix-caching replicas: every
                     turn is a new request carrying the whole conversation, sent to the next
                     replica, which reuses what its own tiers hold and computes the rest; no
                     shared tier (round-robin+shared: the same with a shared tier)

--documents shared is the issue's workload (one document for all); `own` gives each
conversation its own document, as in LMCache's multi-round QA. A replica runs its sessions' calls
in shared forward steps (continuous batching) and the replicas share this machine's cores: the
figures are bound by its CPU, and TTFT includes waiting for steps that carry other sessions' tokens.

    python benchmarks/bench_cluster.py                                  # SmolLM2-135M, 2K-token document, 8 x 3 turns
    python benchmarks/bench_cluster.py --replicas 2 --runs 3                      # medians of 3 runs each
    python benchmarks/bench_cluster.py --doc-tokens 512 --conversations 4 --replicas 2 --documents own
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table
from spread import spread

from runtime import Cluster
from runtime.actors import start_ray
from runtime.model import load_header
from tiered import StoreConfig


def documents(tokenizer, tokens: int, count: int) -> list[list[int]]:
    """`count` different documents of `tokens` tokens: consecutive stretches of the shipped text."""
    text = (Path(__file__).resolve().parents[1] / "runtime" / "data" / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode(text[: tokens * count * 8])
    if len(ids) < tokens * count:
        raise SystemExit(f"the text has only {len(ids)} tokens, not {tokens} x {count}")
    return [ids[k * tokens : (k + 1) * tokens] for k in range(count)]


def questions(tokenizer, k: int, turns: int, length: int) -> list[list[int]]:
    out = []
    for turn in range(turns):
        ids = tokenizer.encode(f" Question {k}.{turn}: who speaks next, and why does it matter to the play?")
        out.append((ids * (1 + length // max(1, len(ids))))[:length])
    return out


def converse(cluster: Cluster, doc: list[int], turns: list[list[int]], new_tokens: int,
             stateless: bool, turn_starts: threading.Barrier) -> list[tuple[int, float, int]]:
    """(turn, TTFT seconds, tokens processed) per turn of one conversation. `stateless`: every turn
    is a new request with the whole conversation (a new session, closed after it). Each turn begins
    when every conversation has reached `turn_starts`."""
    rows, history = [], []
    session = None if stateless else cluster.open()
    try:
        for turn, question in enumerate(turns):
            turn_starts.wait()
            prompt = doc + question if turn == 0 else question
            start_s = time.perf_counter()
            if stateless:
                session = cluster.open()
                session.extend(history + prompt)
            else:
                session.extend(prompt)
            tokens = session.stream(new_tokens)
            first = next(tokens, None)
            ttft_s = time.perf_counter() - start_s
            answer = [t for t in [first] if t is not None] + list(tokens)
            history += prompt + answer
            rows.append((turn, ttft_s, len(prompt) + len(answer)))
            if stateless:
                session.close()
    except BaseException:
        turn_starts.abort()  # the other conversations stop at their next turn instead of waiting for this one
        raise
    finally:
        if session is not None:
            session.close()
    return rows


def run(args, replicas: int, routing: str, tokenizer) -> dict:
    docs = documents(tokenizer, args.doc_tokens, args.conversations if args.documents == "own" else 1)
    doc_of = [docs[k % len(docs)] for k in range(args.conversations)]
    config = StoreConfig(device="cpu", block_tokens=args.block_tokens, device_bytes=args.device_mib << 20,
                         host_bytes=args.host_mib << 20)
    stateless = routing.startswith("round-robin")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as shared:
        shared_dir = shared if routing != "round-robin" else None
        with Cluster(model=args.model, workers=replicas, store_config=config, shared_dir=shared_dir,
                     routing="round-robin" if stateless else routing) as cluster:
            for doc in docs:  # each document's first reader: its blocks are then cached on a replica
                warm = cluster.open()
                warm.extend(doc)
                warm.close()
            turn_starts = threading.Barrier(args.conversations)
            start_s = time.perf_counter()
            with ThreadPoolExecutor(args.conversations) as pool:
                results = list(pool.map(
                    lambda k: converse(cluster, doc_of[k], questions(tokenizer, k, args.turns, args.question_tokens),
                                       args.new_tokens, stateless, turn_starts),
                    range(args.conversations)))
            wall_s = time.perf_counter() - start_s
            failover_s = failover(cluster, docs[0], args) if replicas > 1 and not stateless else None
    rows = [row for conv in results for row in conv]
    per_turn = {t: statistics.median(ttft for turn, ttft, _ in rows if turn == t) for t in range(args.turns)}
    return {"replicas": replicas, "routing": routing, "tokens_per_s": sum(n for *_, n in rows) / wall_s,
            "ttft_s": per_turn, "failover_s": failover_s}


def failover(cluster: Cluster, doc: list[int], args) -> float:
    session = cluster.open()
    session.extend(doc[: args.doc_tokens // 2])
    session.generate(2)
    session.save()
    ray.kill(cluster.worker_of(session.session_id))
    start_s = time.perf_counter()
    next(session.stream(1), None)
    elapsed_s = time.perf_counter() - start_s
    session.close()
    return elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens answered per turn (LMCache's multi-round QA answers 100)")
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--device-mib", type=int, default=256, help="each replica's device tier")
    parser.add_argument("--host-mib", type=int, default=256, help="each replica's host tier")
    parser.add_argument("--documents", choices=("shared", "own"), default="shared",
                        help="one document for all conversations, or one each")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--routings", default="prefix-affinity,round-robin",
                        help="prefix-affinity, round-robin, round-robin+shared (see the module docstring)")
    parser.add_argument("--runs", type=int, default=1, help="runs of every configuration, taking turns (medians)")
    args = parser.parse_args()
    _, tokenizer = load_header(args.model)
    start_ray("local")
    console = Console(width=160)
    console.print(f"{platform.processor() or platform.machine()}, {ray.cluster_resources().get('CPU', 0):g} CPUs; "
                  f"{args.model}; {args.conversations} conversations x {args.turns} turns over {args.documents} "
                  f"{args.doc_tokens}-token documents, {args.new_tokens} tokens answered per turn; {args.runs} runs")
    configs = [(int(r), routing) for r in args.replicas.split(",") for routing in args.routings.split(",")]
    results: dict[tuple[int, str], list[dict]] = {config: [] for config in configs}
    for run_index in range(args.runs):  # configurations take turns, so drift on the machine reaches them all
        for replicas, routing in configs:
            r = run(args, replicas, routing, tokenizer)
            results[replicas, routing].append(r)
            console.print(f"run {run_index + 1}: {replicas} replicas, {routing}: {r['tokens_per_s']:.0f} tok/s, TTFT "
                          + ", ".join(f"{r['ttft_s'][t]:.2f}" for t in range(args.turns)) + " s")
    turns = range(args.turns)
    table = Table("replicas", "routing", "tok/s", *(f"TTFT turn {t + 1} s" for t in turns), "failover s",
                  title="medians of the runs (range)")
    for (replicas, routing), rows in results.items():
        failovers = [r["failover_s"] for r in rows if r["failover_s"] is not None]
        table.add_row(str(replicas), routing, spread([r["tokens_per_s"] for r in rows], "{:.0f}"),
                      *(spread([r["ttft_s"][t] for r in rows]) for t in turns), spread(failovers) if failovers else "-")
    console.print(table)
    ratios = Table("replicas", "TTFT ratio", *(f"turn {t + 1}" for t in turns),
                   title="time to first token, baseline / prefix-affinity, run by run: median (range)")
    for replicas in dict.fromkeys(r for r, _ in configs):
        ours = results.get((replicas, "prefix-affinity"))
        for baseline in ("round-robin", "round-robin+shared"):
            theirs = results.get((replicas, baseline))
            if ours and theirs:
                ratios.add_row(str(replicas), f"{baseline} / prefix-affinity",
                               *(spread([b["ttft_s"][t] / a["ttft_s"][t] for a, b in zip(ours, theirs)], "{:.1f}x")
                                 for t in turns))
    console.print(ratios)
    console.print("bound by this machine's CPUs: replicas share its cores; TTFT includes queueing behind other sessions")
    ray.shutdown()


if __name__ == "__main__":
    main()
