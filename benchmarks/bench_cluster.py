"""The cluster on this machine: aggregate tokens/s and time to first token (TTFT) per turn of
concurrent conversations over a shared document, with prefix-aware routing against round-robin,
for 1 and 2 replicas; and failover time (ray.kill of a session's replica -> its next token).

Each conversation: the document and a question, then --turns - 1 more questions, --new-tokens
generated greedily after each. Conversations run concurrently (one thread each); a replica
serves its sessions one call at a time, so with 2 cores the figures are bound by this machine's
CPU: 2 replicas cannot beat 1 by more than the cores they get, and TTFT includes queueing
behind other sessions' calls on the same replica.

    python benchmarks/bench_cluster.py                                  # SmolLM2-135M, 2K-token document, 8 x 3 turns
    python benchmarks/bench_cluster.py --doc-tokens 512 --conversations 4 --replicas 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from runtime import Cluster, load_model
from runtime.actors import start_ray
from tiered import StoreConfig


def document(tokenizer, tokens: int) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "runtime" / "data" / "tinyshakespeare.txt").read_text()
    ids = tokenizer.encode(text[: tokens * 8])[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"the document has only {len(ids)} tokens")
    return ids


def questions(tokenizer, k: int, turns: int, length: int) -> list[list[int]]:
    out = []
    for turn in range(turns):
        ids = tokenizer.encode(f" Question {k}.{turn}: who speaks next, and why does it matter to the play?")
        out.append((ids * (1 + length // max(1, len(ids))))[:length])
    return out


def converse(cluster: Cluster, doc: list[int], turns: list[list[int]], new_tokens: int) -> list[tuple[int, float, int]]:
    """(turn, TTFT seconds, tokens processed) per turn of one conversation."""
    session = cluster.open()
    rows = []
    try:
        for turn, question in enumerate(turns):
            prompt = doc + question if turn == 0 else question
            start_s = time.perf_counter()
            session.extend(prompt)
            tokens = session.stream(new_tokens)
            first = next(tokens, None)
            ttft_s = time.perf_counter() - start_s
            generated = (first is not None) + sum(1 for _ in tokens)
            rows.append((turn, ttft_s, len(prompt) + generated))
    finally:
        session.close()
    return rows


def run(args, replicas: int, routing: str, model_tokenizer) -> dict:
    doc = document(model_tokenizer, args.doc_tokens)
    config = StoreConfig(device="cpu", block_tokens=args.block_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as shared, \
            Cluster(model=args.model, workers=replicas, store_config=config, shared_dir=shared, routing=routing) as cluster:
        warm = cluster.open()  # the document's first reader: its blocks are then cached on one replica
        warm.extend(doc)
        warm.close()
        start_s = time.perf_counter()
        with ThreadPoolExecutor(args.conversations) as pool:
            results = list(pool.map(lambda k: converse(cluster, doc, questions(model_tokenizer, k, args.turns,
                                                                               args.question_tokens), args.new_tokens),
                                    range(args.conversations)))
        wall_s = time.perf_counter() - start_s
        failover_s = failover(cluster, doc, args) if replicas > 1 else None
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
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--routings", default="prefix-affinity,round-robin")
    args = parser.parse_args()
    tokenizer = load_model(args.model).tokenizer
    start_ray("local")
    print(f"# {platform.processor() or platform.machine()}, {ray.cluster_resources().get('CPU', 0):g} CPUs; "
          f"{args.model}; {args.conversations} conversations x {args.turns} turns over a {args.doc_tokens}-token document")
    print(f"{'replicas':>8} {'routing':>16} {'tok/s':>8} " + " ".join(f"{f'ttft{t + 1} s':>9}" for t in range(args.turns))
          + f" {'failover s':>10}")
    results = []
    for replicas in (int(r) for r in args.replicas.split(",")):
        for routing in args.routings.split(","):
            r = run(args, replicas, routing, tokenizer)
            results.append(r)
            failover_s = "-" if r["failover_s"] is None else f"{r['failover_s']:.2f}"
            print(f"{replicas:>8} {routing:>16} {r['tokens_per_s']:>8.0f} "
                  + " ".join(f"{r['ttft_s'][t]:>9.3f}" for t in range(args.turns)) + f" {failover_s:>10}", flush=True)
    for replicas in {r["replicas"] for r in results}:
        by = {r["routing"]: r for r in results if r["replicas"] == replicas}
        if {"prefix-affinity", "round-robin"} <= set(by):
            speedups = [by["round-robin"]["ttft_s"][t] / by["prefix-affinity"]["ttft_s"][t] for t in range(args.turns)]
            print(f"# {replicas} replicas: TTFT round-robin / prefix-affinity per turn: "
                  + ", ".join(f"{s:.1f}x" for s in speedups))
    print("# bound by this machine's CPUs: replicas share its cores; TTFT includes queueing behind other sessions")
    ray.shutdown()


if __name__ == "__main__":
    main()
