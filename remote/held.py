"""Values a worker holds for its clients by content digest (conditioning sent once)."""

from __future__ import annotations

import threading
from typing import Any

from diffsplit.engine.lru import LruTable
from diffsplit.remote.cache import module_bytes

#: What every held entry costs on top of its tensors (keys, containers, bookkeeping).
ENTRY_OVERHEAD_BYTES = 4096


class HeldValues:
    """A small LRU of decoded input values keyed by their content digest, under a byte budget."""

    def __init__(self, budget_bytes: int = 256 << 20, max_entries: int = 1024) -> None:
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self._values: LruTable[str, Any] = LruTable(max_entries=max_entries, max_bytes=budget_bytes)
        self._lock = threading.Lock()

    def put(self, digest: str, value: Any) -> None:
        """Hold ``value`` under ``digest`` (evicting the least recently used beyond the budget)."""
        size = module_bytes(value) + ENTRY_OVERHEAD_BYTES
        with self._lock:
            if self._values.fits(size):
                self._values.put(digest, value, size)

    def snapshot(self, digests: list[str]) -> dict[str, Any]:
        """The held values among ``digests`` (missing ones are left out), marked as recently used."""
        with self._lock:
            found = {}
            for digest in digests:
                if digest in self._values:
                    found[digest] = self._values.get(digest)
            return found

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._values
