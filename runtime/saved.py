"""Saved sessions: one JSON manifest per session in `sessions/` of the disk tier's directory.

A manifest records what it takes to continue a conversation in another process: the session id,
the token log (the source of truth: KV is a cache of it), the session's options and the model
fingerprint and block size its blocks are keyed by. It is written atomically (temporary file,
fsync, rename), so a save that is killed leaves the previous one intact, and carries a checksum,
so a damaged file is refused with a clear error instead of resuming the wrong conversation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from tiered.disk.files import atomic_write, ensure_private_dir

FORMAT = 1
DIRECTORY = "sessions"
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_session_id(session_id: object) -> str:
    """`session_id` if it is 1..128 letters, digits, '.', '_' or '-' (not first); ValueError otherwise."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"a session id is 1..128 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {session_id!r}"
        )
    return session_id


@dataclass(frozen=True)
class SavedSession:
    """What `Session.save` records."""

    session_id: str
    fingerprint: str
    block_tokens: int
    tokens: list[int]
    options: dict = field(default_factory=dict)  # mode, budget_tokens, importance, ... as Session takes them
    saved_at_s: float = 0.0  # Unix time of the save

    def summary(self) -> dict:
        """What `tiered sessions` lists: everything but the token log, and its length."""
        return {"session_id": self.session_id, "tokens": len(self.tokens), "saved_at_s": self.saved_at_s,
                "mode": self.options.get("mode", "exact"), "fingerprint": self.fingerprint}


def sessions_dir(disk_dir: str | Path) -> Path:
    return Path(disk_dir) / DIRECTORY


def write(disk_dir: str | Path, saved: SavedSession) -> Path:
    """Record `saved` under `disk_dir`, replacing an earlier save of the same id atomically."""
    directory = sessions_dir(disk_dir)
    ensure_private_dir(directory)
    body = asdict(saved)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    document = {"format": FORMAT, "checksum": xxhash.xxh3_64_hexdigest(text.encode()), "session": body}
    path = directory / f"{check_session_id(saved.session_id)}.json"
    atomic_write(path, json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    return path


def read(disk_dir: str | Path, session_id: str) -> SavedSession:
    """The saved session `session_id`; KeyError if none is saved, ValueError if its file is damaged."""
    path = sessions_dir(disk_dir) / f"{check_session_id(session_id)}.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyError(f"no saved session {session_id!r} in {sessions_dir(disk_dir)}") from None
    return _parse(path, data)


def listing(disk_dir: str | Path) -> list[SavedSession]:
    """Every readable saved session under `disk_dir`, oldest save first (damaged files are skipped)."""
    directory = sessions_dir(disk_dir)
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            found.append(_parse(path, path.read_bytes()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda saved: saved.saved_at_s)


def delete(disk_dir: str | Path, session_id: str) -> bool:
    """Remove the save of `session_id`; True if there was one."""
    path = sessions_dir(disk_dir) / f"{check_session_id(session_id)}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _parse(path: Path, data: bytes) -> SavedSession:
    try:
        document = json.loads(data)
        body = document["session"]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT}")
        if document.get("checksum") != xxhash.xxh3_64_hexdigest(text.encode()):
            raise ValueError("checksum mismatch")
        saved = SavedSession(**body)
        tokens_ok = isinstance(saved.tokens, list) and all(type(t) is int and t >= 0 for t in saved.tokens)
        if not tokens_ok or not isinstance(saved.options, dict) or type(saved.block_tokens) is not int:
            raise ValueError("malformed fields")
        check_session_id(saved.session_id)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"saved session {path} is damaged: {error}") from None
    return saved
