"""Built models keyed by recipe digest, least recently used first out, under a byte budget."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def module_bytes(obj: Any) -> int:
    """Bytes of parameters and buffers reachable from ``obj`` (modules, dataclasses, containers).

    Tensors shared between two modules are counted once.
    """
    seen: set[int] = set()
    total = 0
    for tensor in _tensors_of(obj, set()):
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _tensors_of(obj: Any, visited: set[int]) -> Iterator[torch.Tensor]:
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors_of(getattr(obj, field.name), visited)
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors_of(item, visited)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_of(item, visited)
    elif hasattr(obj, "components") and isinstance(obj.components, dict):  # a diffusers pipeline
        for item in obj.components.values():
            yield from _tensors_of(item, visited)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int
    build_seconds: float


@dataclass
class _Entry:
    value: Any
    size: int


class ModelCache:
    """An LRU of built models under ``budget_bytes``.

    ``get_or_build(digest, build)`` builds each digest once even when several
    threads ask at the same time; later callers wait for the first build. An
    entry larger than the whole budget is returned but not kept.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Event] = {}
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._build_seconds = 0.0

    def get_or_build(self, digest: str, build: Callable[[], Any]) -> tuple[Any, bool]:
        """The value for ``digest`` and whether it was a cache hit."""
        while True:
            with self._lock:
                entry = self._entries.get(digest)
                if entry is not None:
                    self._entries.move_to_end(digest)
                    self._hits += 1
                    return entry.value, True
                pending = self._building.get(digest)
                if pending is None:
                    self._building[digest] = threading.Event()
                    self._misses += 1
                    break
            pending.wait()
        started = time.perf_counter()
        value: Any = None
        built = False
        try:
            value = build()
            built = True
        finally:
            size = module_bytes(value) if built else 0
            with self._lock:
                self._build_seconds += time.perf_counter() - started
                if built:
                    self._insert_locked(digest, value, size)  # before waiters wake: they find it
                event = self._building.pop(digest)
            event.set()
        return value, False

    def peek(self, digest: str) -> bool:
        """Whether ``digest`` is cached (does not count as a hit)."""
        with self._lock:
            return digest in self._entries

    def digests(self) -> list[str]:
        """Cached digests, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        """Counters and sizes now."""
        with self._lock:
            return CacheStats(
                hits=self._hits, misses=self._misses, evictions=self._evictions,
                entries=len(self._entries), bytes=sum(e.size for e in self._entries.values()),
                budget_bytes=self.budget_bytes, build_seconds=self._build_seconds,
            )

    def _insert_locked(self, digest: str, value: Any, size: int) -> None:
        """Keep ``value`` (the lock is held), evicting least recently used entries over budget."""
        if size > self.budget_bytes:
            return
        self._entries[digest] = _Entry(value, size)
        self._entries.move_to_end(digest)
        used = sum(e.size for e in self._entries.values())
        while used > self.budget_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            used -= evicted.size
            self._evictions += 1
