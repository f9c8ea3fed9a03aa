"""`tiered serve` under a multi-turn load, with prefix reuse and without (the server's --no-reuse),
and with continuous batching and without (`unbatched`: the server's --max-sequences 1, each
replica computes one conversation per forward step), modeled on SGLang's bench_multiturn.py and
LMCache's multi-round QA benchmark.

N users x R rounds: each user's conversation is a shared long document, its own history, and a new
question per round; a user sends its next round an exponential think time (Poisson arrivals at
--rate per user) after its previous answer, through the `openai` async client, streaming. Reported
per round: time to first token (p50, p90); overall: requests/s, output tokens/s, the cached-token
ratio (usage.prompt_tokens_details.cached_tokens / prompt_tokens), and errors. Each mode starts
its own `tiered serve` (SmolLM2-135M by default) on 127.0.0.1 and stops it after.

    python benchmarks/bench_serve.py                           # 8 users x 4 rounds, 512-token document
    python benchmarks/bench_serve.py --users 4 --rounds 3      # the size docs/BENCHMARKS.md reports
    python benchmarks/bench_serve.py --users 8 --rounds 4 --doc-tokens 2048 --workers 2
    python benchmarks/bench_serve.py --modes reuse,unbatched   # continuous batching's gain at 8 users
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --modes reuse   # an already running server
    python benchmarks/bench_serve.py --plot ttft.png --plot-from run1.json run2.json run3.json   # medians of runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
MODES = {"reuse": [], "no-reuse": ["--no-reuse"], "unbatched": ["--max-sequences", "1"]}  # mode -> server options
SYSTEM = "You are a helpful assistant. Answer questions about the document briefly."


def document(chars: int) -> str:
    return (ROOT / "runtime" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]


def question(user: int, round_: int) -> str:
    return f"Question {round_ + 1} from reader {user}: who speaks in line {7 * user + round_ + 1}, and why?"


async def converse(client, model: str, user: int, doc: str, args, records: list, start_s: float) -> None:
    """One user's rounds; a record per round: (round, TTFT s, prompt tokens, cached tokens, output tokens, ok, user)."""
    rng = random.Random(args.seed * 1000 + user)
    messages = [{"role": "system", "content": SYSTEM}]
    for round_ in range(args.rounds):
        await asyncio.sleep(rng.expovariate(args.rate))
        content = f"{doc}\n\n{question(user, round_)}" if round_ == 0 else question(user, round_)
        messages.append({"role": "user", "content": content})
        sent_s = time.perf_counter()
        ttft_s, text, usage = None, [], None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft_s = ttft_s if ttft_s is not None else time.perf_counter() - sent_s
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            ok = usage is not None
        except openai.APIError as error:
            print(f"  user {user} round {round_ + 1}: {type(error).__name__}: {error}", file=sys.stderr)
            ok = False
        if ok:
            records.append((round_ + 1, ttft_s if ttft_s is not None else time.perf_counter() - sent_s,
                            usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens, True,
                            user))
        else:
            records.append((round_ + 1, None, 0, 0, 0, False, user))
        messages.append({"role": "assistant", "content": "".join(text)})


async def load(url: str, model: str, api_key: str, args, server_pid: int | None = None) -> dict:
    doc = document(args.doc_tokens * 4)  # about 4 characters per token of this text
    records: list = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=900) as client:
        start_s = time.perf_counter()
        users = [converse(client, model, u, doc, args, records, start_s) for u in range(args.users)]
        if args.kill_replica_after_s is not None and server_pid is not None:
            users.append(kill_one_replica(server_pid, args.kill_replica_after_s))
        await asyncio.gather(*users)
        wall_s = time.perf_counter() - start_s
    done = [r for r in records if r[5]]
    per_round = {}
    for round_ in range(1, args.rounds + 1):
        ttfts = sorted(r[1] for r in done if r[0] == round_)
        per_round[round_] = {"ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p90_s": _quantile(ttfts, 0.9), "requests": len(ttfts)}
    later = sorted(r[1] for r in done if r[0] >= 2)
    prompt, cached = sum(r[2] for r in done), sum(r[3] for r in done)
    failed_users = len({r[6] for r in records if not r[5]})
    return {"failed_conversations": failed_users, "per_round": per_round, "ttft_p50_rounds_2plus_s": _quantile(later, 0.5), "wall_s": wall_s,
            "requests_per_s": len(done) / wall_s, "output_tokens_per_s": sum(r[4] for r in done) / wall_s,
            "cached_ratio": cached / prompt if prompt else 0.0, "prompt_tokens": prompt, "errors": len(records) - len(done)}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def start_server(args, mode: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "runtime.cli", "serve", "--model", args.model, "--workers", str(args.workers),
               "--port", str(port), "--device-mib", str(args.device_mib), "--host-mib", str(args.host_mib),
               "--api-key", "bench", "--step-tokens", str(args.step_tokens)] + MODES[mode]
    log = open(Path(args.log_dir) / f"serve-{mode}.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    url = f"http://127.0.0.1:{port}"
    deadline_s = time.monotonic() + 600
    import urllib.request

    while time.monotonic() < deadline_s:
        if server.poll() is not None:
            raise SystemExit(f"tiered serve exited with {server.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        time.sleep(1)
    stop_server(server)
    raise SystemExit(f"tiered serve did not become healthy; see {log.name}")


def replica_pids(server_pid: int) -> list[int]:
    """Processes of the server's SessionReplicas: Ray names them `ray::ServeReplica:tiered:SessionReplica`,
    and they run in the session the server leads (only processes this benchmark started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::ServeReplica:tiered:SessionReplica") and os.getsid(int(entry.name)) == server_pid:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return sorted(pids)


async def kill_one_replica(server_pid: int, after_s: float) -> None:
    await asyncio.sleep(after_s)
    pids = replica_pids(server_pid)
    if not pids:
        print("  no replica process found to kill", file=sys.stderr)
        return
    os.kill(pids[0], signal.SIGKILL)
    print(f"  killed replica process {pids[0]} at {after_s:.1f} s (of {len(pids)})", file=sys.stderr)


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def report(mode: str, result: dict) -> None:
    table = Table("round", "TTFT p50 s", "TTFT p90 s", "requests", title=(
        f"{mode}: {result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} output tok/s, "
        f"cached-token ratio {result['cached_ratio']:.1%} of {result['prompt_tokens']} prompt tokens, "
        f"{result['errors']} errors ({result['failed_conversations']} conversations), {result['wall_s']:.1f} s"))
    for round_, row in result["per_round"].items():
        table.add_row(str(round_), *("-" if row[key] is None else f"{row[key]:.3f}" for key in ("ttft_p50_s", "ttft_p90_s")),
                      str(row["requests"]))
    Console().print(table)


def median_per_round(runs: list[dict]) -> dict:
    """mode -> round -> median over runs of the round's TTFT p50 (runs: the `results` of --json files)."""
    out: dict = {}
    for mode in MODES:
        rounds = sorted({int(r) for run in runs if mode in run for r in run[mode]["per_round"]})
        out[mode] = {r: statistics.median(run[mode]["per_round"][str(r) if str(r) in run[mode]["per_round"] else r]
                                          ["ttft_p50_s"] for run in runs if mode in run) for r in rounds}
    return {mode: rows for mode, rows in out.items() if rows}


def plot(per_round: dict, path: str) -> None:
    """TTFT p50 per round, one line per mode, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for mode, rows in per_round.items():
        ax.plot(list(rows), list(rows.values()), marker="o", label=mode)
    ax.set(xlabel="round", ylabel="TTFT p50 (s)", yscale="log", title="tiered serve: time to first token per round")
    ax.set_xticks(sorted({r for rows in per_round.values() for r in rows}))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=512, help="length of the shared document (about)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length per round")
    parser.add_argument("--rate", type=float, default=2.0, help="per user: rounds per second of think time (Poisson)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device-mib", type=int, default=256)
    parser.add_argument("--host-mib", type=int, default=512)
    parser.add_argument("--step-tokens", type=int, default=512,
                        help="the server's --step-tokens: tokens one batched forward step computes at most")
    parser.add_argument("--modes", default="reuse,no-reuse", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--url", default=None, help="an already running server (then --modes names what it runs)")
    parser.add_argument("--api-key", default="bench", help="with --url")
    parser.add_argument("--served-model", default=None, help="with --url: the model id (default: --model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp", help="where the servers' logs go")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--kill-replica-after-s", type=float, default=None,
                        help="SIGKILL one replica process of the server this many seconds into each run")
    parser.add_argument("--plot", default=None, help="draw TTFT p50 per round into this PNG")
    parser.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                        help="with --plot: draw the medians of these --json files instead of running")
    args = parser.parse_args(argv)
    if args.plot_from:
        if not args.plot:
            parser.error("--plot-from needs --plot")
        plot(median_per_round([json.loads(Path(f).read_text())["results"] for f in args.plot_from]), args.plot)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    print(f"{platform.node()} ({os.cpu_count()} CPUs): {args.users} users x {args.rounds} rounds, "
          f"{args.doc_tokens}-token document, {args.max_tokens} tokens per answer, {args.workers} replica(s)")
    results = {}
    for mode in modes:
        if args.url:
            results[mode] = asyncio.run(load(args.url, args.served_model or args.model, args.api_key, args))
        else:
            server, url = start_server(args, mode)
            try:
                results[mode] = asyncio.run(load(url, args.model, "bench", args, server.pid))
            finally:
                stop_server(server)
        report(mode, results[mode])
    if "reuse" in results and "no-reuse" in results:
        reuse, cold = results["reuse"]["ttft_p50_rounds_2plus_s"], results["no-reuse"]["ttft_p50_rounds_2plus_s"]
        if reuse and cold:
            print(f"\nTTFT p50 of rounds >= 2: {cold:.3f} s without reuse / {reuse:.3f} s with = {cold / reuse:.1f}x")
    if "reuse" in results and "unbatched" in results:
        batched, alone = results["reuse"]["output_tokens_per_s"], results["unbatched"]["output_tokens_per_s"]
        print(f"output tokens/s: {batched:.1f} batched / {alone:.1f} unbatched = {batched / alone:.2f}x")
    if args.plot:
        plot(median_per_round([results]), args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
