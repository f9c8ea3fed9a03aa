"""The background compactor: a daemon thread that compacts sparse segments when woken."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .log import SegmentLog


class Compactor(threading.Thread):
    """Runs `log.compact()` each time it is woken, until stopped. Errors are counted, not raised:
    a failed compaction leaves every record where it was."""

    def __init__(self, log: SegmentLog) -> None:
        super().__init__(name="tiered-disk-compactor", daemon=True)
        self._log = log
        self._wakeup = threading.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wakeup.set()

    def stop(self) -> None:
        """Ask the thread to finish and wait until it has (a compaction under way completes its record)."""
        self._stopping = True
        self._wakeup.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                self._log.compact()
            except (OSError, RuntimeError) as err:  # RuntimeError: the log closed under it
                self._log.counters.last_error = f"compaction failed: {err}"
