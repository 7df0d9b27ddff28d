"""One least-recently-used table for every bounded cache: entries by key, a running byte total, limits.

The caches of the client and the worker (node outputs, held conditioning, built
models, device copies, run times, request bookkeeping) keep their own state and
their own lock beside the entries, so :class:`LruTable` takes no lock: its owner's
lock guards it. Order is least recently used first; :meth:`get` and :meth:`put`
make an entry the most recent, :meth:`peek` does not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class Evicted(Generic[K, V]):
    """An entry a table let go to stay within its limits."""

    key: K
    value: V
    size: int


class LruTable(Generic[K, V]):
    """Entries in least-recently-used order under optional ``max_entries`` and ``max_bytes`` limits.

    Each entry has a size (bytes, 0 when the owner does not count them); the
    total is kept as entries come and go, never summed again. :meth:`put` evicts
    the least recently used entries beyond a limit, never the one it just put; an
    entry larger than ``max_bytes`` on its own is refused (ask :meth:`fits` first).
    """

    def __init__(self, *, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    @property
    def total_bytes(self) -> int:
        """The sum of the entries' sizes."""
        return self._bytes

    def fits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes can be kept at all (it is within ``max_bytes``)."""
        return self.max_bytes is None or size <= self.max_bytes

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> V | None:
        """The value under ``key`` without marking it used, or None."""
        found = self._entries.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V, size: int = 0) -> list[Evicted[K, V]]:
        """Keep ``value`` under ``key`` as the most recent entry; the entries evicted for it, oldest first."""
        if size < 0:
            raise ValueError(f"an entry's size must be >= 0, not {size}")
        if not self.fits(size):
            raise ValueError(f"an entry of {size} bytes exceeds the table's {self.max_bytes} bytes")
        self.pop(key)
        self._entries[key] = (value, size)
        self._bytes += size
        evicted: list[Evicted[K, V]] = []
        while len(self._entries) > 1 and self._over_limits():
            old_key, (old_value, old_size) = self._entries.popitem(last=False)
            self._bytes -= old_size
            evicted.append(Evicted(old_key, old_value, old_size))
        return evicted

    def pop(self, key: K) -> V | None:
        """Remove the entry under ``key``; its value, or None."""
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self._bytes -= found[1]
        return found[0]

    def evict_until(self, within_bytes: int, *, can_evict: Callable[[K, V], bool] | None = None
                    ) -> list[Evicted[K, V]]:
        """Evict the least recently used entries ``can_evict`` allows until the total is ``within_bytes``.

        Entries it refuses stay in place; the total may still exceed the bound when too few could go.
        """
        evicted: list[Evicted[K, V]] = []
        for key, (value, size) in list(self._entries.items()):
            if self._bytes <= within_bytes:
                break
            if can_evict is None or can_evict(key, value):
                self.pop(key)
                evicted.append(Evicted(key, value, size))
        return evicted

    def items(self) -> list[tuple[K, V]]:
        """(key, value) of every entry, least recently used first (a copy: the table may change)."""
        return [(key, value) for key, (value, _) in self._entries.items()]

    def values(self) -> list[V]:
        """Every value, least recently used first."""
        return [value for value, _ in self._entries.values()]

    def keys(self) -> list[K]:
        """Every key, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._bytes = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def _over_limits(self) -> bool:
        too_many = self.max_entries is not None and len(self._entries) > self.max_entries
        too_big = self.max_bytes is not None and self._bytes > self.max_bytes
        return too_many or too_big
