"""Sessions that outlive a process: save and resume in a new process, SIGKILL, lost disk files,
reuse across processes with other hash seeds. Real processes, real files, a tiny random Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import Session
from runtime.cli import main as cli

from .session_child import BLOCK_TOKENS, prompt, store_config

PROMPT, FIRST, THEN = 150, 10, 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """FIRST then THEN greedy tokens of one session that never stops."""
    with Session(tiny_model, store_config(str(tmp_path_factory.mktemp("kv") / "kv"))) as session:
        session.extend(prompt(tiny_model, PROMPT))
        return session.generate(FIRST, stop=[]), session.generate(THEN, stop=[])


def child(tiny_dir, disk_dir, *args, seed: str = "0", check: bool = True) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run([sys.executable, "-m", "tests.runtime.session_child", str(tiny_dir), str(disk_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return {"returncode": done.returncode}


def test_resume_in_a_new_process_continues_token_for_token(tiny_dir, tmp_path, uninterrupted):
    first = child(tiny_dir, tmp_path / "kv", "start", "chat-1", str(PROMPT), str(FIRST))
    assert first["tokens"] == uninterrupted[0]
    resumed = child(tiny_dir, tmp_path / "kv", "resume", "chat-1", str(THEN))
    assert resumed["tokens"] == uninterrupted[1]
    assert resumed["reused"] >= (PROMPT + FIRST - 1) // BLOCK_TOKENS * BLOCK_TOKENS - BLOCK_TOKENS
    assert resumed["recomputed"] < 2 * BLOCK_TOKENS  # only the partial tail and the last token


def test_resume_after_sigkill_right_after_save(tiny_dir, tmp_path, uninterrupted):
    assert child(tiny_dir, tmp_path / "kv", "start", "chat-2", str(PROMPT), str(FIRST), "--kill", check=False) == {
        "returncode": -signal.SIGKILL
    }
    resumed = child(tiny_dir, tmp_path / "kv", "resume", "chat-2", str(THEN))
    assert resumed["tokens"] == uninterrupted[1]
    assert resumed["recomputed"] < 2 * BLOCK_TOKENS  # the sealed blocks were on disk when save returned


def test_sigkill_during_saves_leaves_a_whole_earlier_save(tiny_dir, tmp_path, tiny_model):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.session_child", str(tiny_dir), str(tmp_path / "kv"), "save-loop", "loop", "100"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    saved = []
    deadline = time.monotonic() + 120
    while len(saved) < 12 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        saved.append(json.loads(line)["saved"])
    time.sleep(0.013 * len(saved) % 0.05)  # land the kill somewhere inside a later save
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert len(saved) >= 3
    listed = Session.saved(store_config(str(tmp_path / "kv")))
    assert [entry["session_id"] for entry in listed] == ["loop"]
    assert listed[0]["tokens"] >= saved[-1]  # the last confirmed save, or a later whole one
    session = Session.resume(tiny_model, "loop", store_config(str(tmp_path / "kv")))
    assert len(session.tokens) == listed[0]["tokens"] and len(session.generate(3, stop=[])) == 3
    session.close()


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_resume_recomputes_what_the_disk_lost(tiny_dir, tmp_path, uninterrupted, damage):
    child(tiny_dir, tmp_path / "kv", "start", "chat-3", str(PROMPT), str(FIRST))
    segments = sorted((tmp_path / "kv").glob("seg-*.log"))
    assert segments
    for path in segments:
        if damage == "delete":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            for offset in range(200, len(data), 97):  # flip bits all through the records
                data[offset] ^= 0x5A
            path.write_bytes(bytes(data))
    (tmp_path / "kv" / "INDEX.snapshot").unlink(missing_ok=True)
    resumed = child(tiny_dir, tmp_path / "kv", "resume", "chat-3", str(THEN))
    assert resumed["tokens"] == uninterrupted[1]
    assert resumed["recomputed"] >= PROMPT


def test_reuse_across_processes_with_different_hash_seeds(tiny_dir, tmp_path):
    child(tiny_dir, tmp_path / "kv", "start", "chat-4", str(PROMPT), "1", seed="1")
    other = child(tiny_dir, tmp_path / "kv", "reuse", str(PROMPT), seed="2")
    assert other["reused"] == (PROMPT - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert other["computed"] == PROMPT - other["reused"]


def test_saved_sessions_are_listed_resumed_and_deleted(tiny_model, tmp_path):
    config = store_config(str(tmp_path / "kv"))
    with Session(tiny_model, config, session_id="listed") as session:
        session.extend(prompt(tiny_model, 20))
        path = session.save()
    assert path.parent == tmp_path / "kv" / "sessions" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert [(s["session_id"], s["tokens"]) for s in Session.saved(config)] == [("listed", 20)]
    assert Session.saved(tmp_path / "kv") == Session.saved(config)
    resumed = Session.resume(tiny_model, "listed", config)
    resumed.delete()
    assert Session.saved(config) == []
    with pytest.raises(KeyError, match="no saved session 'listed'"):
        Session.resume(tiny_model, "listed", config)


def test_bad_saves_and_resumes_are_refused_clearly(tiny_model, tmp_path):
    config = store_config(str(tmp_path / "kv"))
    with pytest.raises(ValueError, match="session id"):
        Session(tiny_model, config, session_id="../etc/passwd")
    with Session(tiny_model, store_config(str(tmp_path / "kv")).__class__(device="cpu", block_tokens=8)) as session:
        session.extend([5, 6, 7])
        with pytest.raises(ValueError, match="disk tier"):
            session.save()
    with Session(tiny_model, config, session_id="ok") as session:
        session.extend([5, 6, 7])
        manifest = session.save()
    manifest.write_bytes(manifest.read_bytes().replace(b"[5,6,7]", b"[5,6,8]"))
    with pytest.raises(ValueError, match="damaged: checksum mismatch"):
        Session.resume(tiny_model, "ok", config)
    assert Session.saved(config) == []  # a damaged save is not listed as resumable
    manifest.write_bytes(b'{"format": 1, "sess')  # torn
    with pytest.raises(ValueError, match="damaged"):
        Session.resume(tiny_model, "ok", config)


def test_tiered_sessions_and_run_resume(tiny_dir, tmp_path, capsys):
    args = ["run", "--no-ray", "--model", str(tiny_dir), "--context-tokens", "60", "--max-new-tokens", "3",
            "--device-mib", "1", "--host-mib", "1", "--disk-mib", "8", "--disk-dir", str(tmp_path / "kv")]
    assert cli(args + ["--question", "Who?"]) == 0
    out = capsys.readouterr().out
    session_id = out.split("--resume ")[1].split()[0]
    assert cli(["sessions", str(tmp_path / "kv")]) == 0
    listing = capsys.readouterr().out
    assert session_id in listing and "exact" in listing
    assert cli(args + ["--resume", session_id, "--question", "Why?"]) == 0
    resumed = capsys.readouterr().out
    assert f"resuming session {session_id}" in resumed and "[turn 1] Why?" in resumed
    reused = int(resumed.split("reused ")[1].split(",")[0])
    assert reused > 0
    assert cli(["run", "--no-ray", "--model", str(tiny_dir), "--resume", session_id]) == 2
