"""The in-memory index: key -> where its current record lies, with live bytes per segment."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from ..block import BlockKey


class Location(NamedTuple):
    """Where a record lies and what it is: the index entry of one key (a tuple: cheap to make)."""

    segment_id: int
    offset: int
    length: int  # bytes of the whole record
    header_len: int  # bytes of its header and strings
    seq: int
    raw_len: int  # bytes of the Encoded payload it decodes to
    tokens: int  # tokens of the block


class Index:
    """key -> Location, and per segment the keys it holds and their record bytes. Not locked."""

    def __init__(self) -> None:
        self._entries: dict[BlockKey, Location] = {}
        self._by_segment: dict[int, dict[BlockKey, Location]] = {}
        self._live_bytes: dict[int, int] = {}

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[BlockKey]:
        return iter(self._entries)

    def get(self, key: BlockKey) -> Location | None:
        return self._entries.get(key)

    def items(self) -> list[tuple[BlockKey, Location]]:
        return list(self._entries.items())

    def put(self, key: BlockKey, loc: Location) -> Location | None:
        """Point `key` at `loc`; the location it had before, if any."""
        old = self.pop(key)
        self._entries[key] = loc
        self._by_segment.setdefault(loc.segment_id, {})[key] = loc
        self._live_bytes[loc.segment_id] = self._live_bytes.get(loc.segment_id, 0) + loc.length
        return old

    def merge(self, key: BlockKey, loc: Location) -> Location | None:
        """Keep the newer of `loc` and the key's current entry (higher seq; on a tie, the current).

        The location that lost, or None if there was none.
        """
        current = self._entries.get(key)
        if current is not None and current.seq >= loc.seq:
            return loc
        self.put(key, loc)
        return current

    def pop(self, key: BlockKey) -> Location | None:
        loc = self._entries.pop(key, None)
        if loc is not None:
            del self._by_segment[loc.segment_id][key]
            self._live_bytes[loc.segment_id] -= loc.length
        return loc

    def in_segment(self, segment_id: int) -> list[tuple[BlockKey, Location]]:
        """Entries in one segment, in file order."""
        return sorted(self._by_segment.get(segment_id, {}).items(), key=lambda item: item[1].offset)

    def live_bytes(self, segment_id: int) -> int:
        return self._live_bytes.get(segment_id, 0)

    def drop_segment(self, segment_id: int) -> list[BlockKey]:
        """Forget every key in one segment; those keys."""
        keys = list(self._by_segment.pop(segment_id, {}))
        for key in keys:
            del self._entries[key]
        self._live_bytes.pop(segment_id, None)
        return keys
