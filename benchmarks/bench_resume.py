"""Time to first token of a resumed 4K-token conversation and of a prompt over a cached prefix,
against computing the same tokens again; and the bytes a resume reads per token.

SmolLM2-135M on the CPU, the default StoreConfig but for a disk tier (codec per row).

resume   The conversation (the shipped Shakespeare as a document and a question) is computed
         once and saved. A fresh process loads the model (not timed), drops the page cache where
         the OS lets it, then times Session.resume until stream() yields the first token. The
         baseline, in the same process: a cold session reading the same tokens, to its first token.
prefix   In one process and store: a cold session over a 4K-token prompt, then a new session whose
         prompt shares all but its last 64 tokens (64 new tokens), each until its first streamed token.
bytes    read() bytes of the resume (/proc/self/io rchar) per token of the log, against the
         fp16 size of that token's KV (30 layers x K and V x 3 heads x 64 dims x 2 bytes).

Each figure is the median of --repeats runs (resumes) or --baseline-repeats runs (whatever needs a
cold prefill), with the range.

    python benchmarks/bench_resume.py                       # int8, int4, raw disk codecs; 4K tokens
    python benchmarks/bench_resume.py --tokens 1024 --codecs int8 --repeats 2
    python benchmarks/bench_resume.py --codecs ""          # the prefix figures alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from spread import spread

from runtime import Session, load_model
from tiered import StoreConfig

ANSWER_TOKENS = 1


def seconds(values: list[float]) -> str:
    return f"{spread(values, '{:.3f}')} s"


def conversation(model, tokens: int) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "runtime" / "data" / "tinyshakespeare.txt").read_text()
    body = model.tokenizer.encode(text[: tokens * 6])[: tokens - 48]
    question = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": model.tokenizer.decode(body) + "\n\nWho speaks first?"}]
    )
    return question[:tokens]


def first_token_s(session: Session, ids: list[int] | None) -> tuple[float, int]:
    start = time.perf_counter()
    if ids is not None:
        session.extend(ids)  # the session computes long prompts in chunks of chunk_tokens itself
    tokens = session.stream(1, stop=[])
    token = next(tokens)  # the first token is out: what a streaming client sees
    elapsed = time.perf_counter() - start
    tokens.close()
    return elapsed, token


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """In a fresh process: resume timings (and the re-prefill baseline if asked); one JSON line."""
    torch.set_num_threads(2)
    model = load_model()
    config = StoreConfig(device="cpu", disk_dir=args.disk_dir, disk_codec=args.codec)
    ids = json.loads(Path(args.disk_dir, "ids.json").read_text())
    out = {"resume_s": [], "dropped": [], "rchar": [], "tokens": [], "baseline_s": []}
    for _ in range(args.repeats):
        out["dropped"].append(drop_page_cache())
        before = rchar()
        start = time.perf_counter()
        session = Session.resume(model, "bench", config)
        elapsed, token = first_token_s(session, None)
        out["resume_s"].append(time.perf_counter() - start)
        out["rchar"].append(rchar() - before)
        out["tokens"].append(token)
        session.close()
    for _ in range(args.baseline_repeats):
        with Session(model, StoreConfig(device="cpu")) as cold:
            elapsed, token = first_token_s(cold, ids)
            out["baseline_s"].append(elapsed)
            out["tokens"].append(token)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--codecs", default="int8,int4,raw")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--disk-dir", help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(2)
    model = load_model()
    cfg = model.config
    ids = conversation(model, args.tokens)
    fp16_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    print(f"SmolLM2-135M, {len(ids)}-token conversation; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as scratch:
        for n, codec in enumerate(codec for codec in args.codecs.split(",") if codec):
            disk_dir = Path(scratch) / codec
            config = StoreConfig(device="cpu", disk_dir=str(disk_dir), disk_codec=codec)
            with Session(model, config, session_id="bench") as session:
                _, expected = first_token_s(session, ids)
                session.save()  # the prompt; the resume computes its last token again, for the first answer token
            (disk_dir / "ids.json").write_text(json.dumps(ids))
            command = [sys.executable, __file__, "--child", "--disk-dir", str(disk_dir), "--codec", codec,
                       "--repeats", str(args.repeats), "--baseline-repeats", str(args.baseline_repeats if n == 0 else 0)]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            assert set(result["tokens"]) == {expected}, f"the resumed first token differs: {result['tokens']} vs {expected}"
            if n == 0:
                baseline = result["baseline_s"]
                print(f"re-prefill to first token (fresh process): {seconds(baseline)}")
            resume = result["resume_s"]
            per_token = statistics.median(result["rchar"]) / len(ids)
            faster = statistics.median(baseline) / statistics.median(resume)
            print(f"resume, disk codec {codec:>5}: {seconds(resume)}; {faster:.1f}x "
                  f"faster; page cache dropped: {all(result['dropped'])}; read {per_token / 1024:.1f} KiB per token = "
                  f"{per_token / fp16_bytes_per_token:.2f}x its fp16 KV")
        cold_s, warm_s = [], []
        for repeat in range(args.baseline_repeats):  # each costs a cold prefill
            config = StoreConfig(device="cpu", disk_dir=str(Path(scratch) / f"prefix-{repeat}"))
            with Session(model, config) as cold:
                cold_s.append(first_token_s(cold, ids)[0])
                store = cold.store
                other = ids[:-64] + [ids[-64 + i] ^ 1 for i in range(64)]  # the last 64 tokens differ
                with Session(model, store=store) as warm:
                    elapsed, _ = first_token_s(warm, other)
                    warm_s.append(elapsed)
                    assert warm.stats()["reused_tokens"] >= len(ids) - 128
        print(f"cold prompt to first token: {seconds(cold_s)}; same prefix but 64 tokens: {seconds(warm_s)}; "
              f"{statistics.median(cold_s) / statistics.median(warm_s):.1f}x faster")


if __name__ == "__main__":
    main()
