"""The stores this process has open over a disk directory, shared by the sessions that ask for one.

A disk directory is one store's (its LOCK file says so), so a second Session given the same
StoreConfig in this process joins the store the first one opened instead of failing with
DirectoryBusy; the store closes with the last session that uses it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tiered import StoreConfig, TieredStore

_lock = threading.Lock()
_open: dict[Path, list] = {}  # resolved disk_dir -> [store, sessions using it]


def acquire(config: StoreConfig) -> TieredStore:
    """The open store over config.disk_dir (or a new one; a config without a disk tier always gets a new one)."""
    if config.disk_dir is None:
        return TieredStore(config)
    directory = Path(config.disk_dir).resolve()
    with _lock:
        entry = _open.get(directory)
        if entry is None:
            entry = _open[directory] = [TieredStore(config), 0]
        elif entry[0].config != config:
            raise ValueError(f"{directory} is open in this process with another StoreConfig; "
                             "pass the same config, or the open store as store=")
        entry[1] += 1
        return entry[0]


def release(store: TieredStore) -> None:
    """One session less on `store`; the last one closes it."""
    if store.config.disk_dir is None:
        store.close()
        return
    directory = Path(store.config.disk_dir).resolve()
    with _lock:
        entry = _open.get(directory)
        if entry is None or entry[0] is not store:
            store.close()
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _open[directory]
    store.close()
