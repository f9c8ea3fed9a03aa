"""Trace files: a policies.trace.Trace as a NumPy .npz archive, written without pickle.

The format (arrays and JSON header) is defined in policies/trace/format.py, which converts a
Trace to and from plain arrays; this module is the file part. It lives in runtime/ because
policies/ does no I/O, and because runtime is where traces are captured (`tiered experiment
--capture`) and read (`tiered experiment --trace`). Files are written atomically (a temporary
file in the same directory, then a rename) and read with `allow_pickle=False`, so a trace file
can only ever yield numeric arrays.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from policies.trace import Trace
from tiered.atomic import atomic_path


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` to `path` (conventionally *.npz) atomically; returns the path."""
    if not isinstance(trace, Trace):
        raise TypeError(f"save_trace expects a Trace, got {type(trace).__name__}")
    path = Path(path)
    arrays = trace.to_arrays()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, mode=0o644) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)
    return path


def load_trace(path: str | Path) -> Trace:
    """Read a trace file; ValueError saying what is wrong if it is not a valid trace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{path} is not a readable trace file (.npz written by save_trace): {err}") from None
    try:
        return Trace.from_arrays(arrays)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid trace: {err}") from None
