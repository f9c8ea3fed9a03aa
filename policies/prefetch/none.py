"""none: nothing is prefetched; every block is fetched when attention needs it (on demand)."""

from __future__ import annotations

from .base import PrefetchPolicy, PrefetchRequest, PrefetchView


class NoPrefetch(PrefetchPolicy):
    def _plan(self, view: PrefetchView) -> list[PrefetchRequest]:
        return []
