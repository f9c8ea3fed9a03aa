"""A separate process for the session persistence tests: `python -m tests.runtime.session_child ARGS`.

    MODEL DISK start ID PROMPT GEN [--kill]   a session over the seeded prompt, GEN greedy tokens, save;
                                              --kill: SIGKILL itself right after save returned
    MODEL DISK resume ID GEN                  resume ID and generate GEN greedy tokens
    MODEL DISK reuse PROMPT                   a new session over the seeded prompt: its reuse counters
    MODEL DISK save-loop ID PROMPT            save after every decoded token, printing the log length

Each prints one JSON line (save-loop: one per save) and the store is the persistence tests' config.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from runtime import Session, load_model
from tiered import StoreConfig

BLOCK_TOKENS = 8


def store_config(disk_dir: str) -> StoreConfig:
    block = 2 * 2 * BLOCK_TOKENS * 16 * 4  # the tiny Llama: 2 KV heads, head_dim 16, fp32
    return StoreConfig(device="cpu", device_bytes=16 * block, host_bytes=16 * block, disk_dir=disk_dir,
                       disk_bytes=64 << 20, block_tokens=BLOCK_TOKENS)


def prompt(model, tokens: int) -> list[int]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, model.config.vocab_size, (tokens,), generator=generator).tolist()


def main(argv: list[str]) -> None:
    model_dir, disk_dir, action, *rest = argv
    model = load_model(model_dir)
    config = store_config(disk_dir)
    if action == "start":
        session_id, tokens, gen = rest[0], int(rest[1]), int(rest[2])
        session = Session(model, config, session_id=session_id)
        session.extend(prompt(model, tokens))
        out = session.generate(gen, stop=[])
        session.save()
        if "--kill" in rest:
            os.kill(os.getpid(), signal.SIGKILL)
        print(json.dumps({"tokens": out}))
        session.close()
    elif action == "resume":
        session = Session.resume(model, rest[0], config)
        out = session.generate(int(rest[1]), stop=[])
        stats = session.stats()
        print(json.dumps({"tokens": out, "recomputed": stats["recomputed_tokens"], "reused": stats["reused_tokens"]}))
        session.close()
    elif action == "reuse":
        with Session(model, config) as session:
            session.extend(prompt(model, int(rest[0])))
            stats = session.stats()
            print(json.dumps({"reused": stats["reused_tokens"], "computed": stats["computed_tokens"]}))
    elif action == "save-loop":
        session = Session(model, config, session_id=rest[0])
        session.extend(prompt(model, int(rest[1])))
        session.save()
        for _ in session.stream(model.config.max_position_embeddings - len(session.tokens), stop=[]):
            session.save()
            print(json.dumps({"saved": len(session.tokens)}), flush=True)
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
