"""What filters cost to work out, remembered within a byte bound: a path prefix's ids (a scan of every
path) and a rare filter's FAISS selector (built in about the time of a search)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import faiss
import numpy as np

ID_CACHE_BYTES = 64 << 20  # a prefix held by every one of a million images is 8 MB of ids
SELECTOR_BYTES_PER_ID = 48  # an IDSelectorBatch is a hash set of its ids (and a small Bloom filter)


class IdCache:
    """Least recently used entries, evicted while their accounted bytes exceed `max_bytes`; an entry
    larger than the bound alone is worked out each time instead. Any API client chooses the prefixes,
    so what they cost must stay bounded, whatever they send."""

    def __init__(self, max_bytes: int = ID_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._lock = threading.Lock()

    def ids(self, key, ids_of) -> np.ndarray:
        """Sorted ids: remembered, or `ids_of()`."""
        def find():
            ids = ids_of()
            return ids, ids.nbytes

        return self._get(key, find)

    def selector(self, key, ids_of):
        """A FAISS selector of `ids_of()` (it copies the ids: they are not kept), or None for no ids."""
        def build():
            ids = ids_of()
            return (faiss.IDSelectorBatch(ids) if len(ids) else None), len(ids) * SELECTOR_BYTES_PER_ID

        return self._get(key, build)

    def _get(self, key, make):
        """The value remembered for key, or make() -> (value, its bytes), remembered."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value, cost = make()  # outside the lock: other queries go on meanwhile
        with self._lock:
            if cost <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, int(cost))
                self.nbytes += int(cost)
                while self.nbytes > self.max_bytes:
                    _, (_, freed) = self._entries.popitem(last=False)
                    self.nbytes -= freed
        return value

    def values(self) -> list:
        with self._lock:
            return [value for value, _ in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)
