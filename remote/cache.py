"""Built models keyed by recipe digest, least recently used first out, under a byte budget.

Besides the LRU, the cache knows which entries the running jobs use (a job
wraps its work in :meth:`ModelCache.job_scope`; every model it asks for in
that scope counts as in use until the scope ends), when each entry was last
used, and a human name per entry. :meth:`ModelCache.free_unused` and
:meth:`ModelCache.drop_idle` drop entries no running job uses.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.lru import LruTable

log = logging.getLogger(__name__)
_GIB = 1 << 30


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


def release_memory() -> None:
    """Return dropped models' memory: collect reference cycles, hand cached CUDA blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a no-op until CUDA was initialised: never starts CUDA itself


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
    #: entries dropped by ``free_unused`` / ``drop_idle`` (not counted in ``evictions``)
    unloaded: int = 0
    #: builds larger than the whole budget: not kept, so rebuilt for every request (each is warned about)
    too_large: int = 0


@dataclass(frozen=True)
class CachedModel:
    """One cache entry as status and unload reports show it (no value, no paths)."""

    digest: str
    name: str
    bytes: int
    idle_s: float
    in_use: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a reply."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FreeResult:
    """What :meth:`ModelCache.free_unused` dropped, and what it kept because a running job uses it."""

    freed: tuple[CachedModel, ...]
    kept: tuple[CachedModel, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(model.bytes for model in self.freed)


@dataclass
class _Entry:
    value: Any
    size: int
    name: str
    last_used: float


class ModelCache:
    """An LRU of built models under ``budget_bytes``.

    ``get_or_build(digest, build)`` builds each digest once even when several
    threads ask at the same time; later callers wait for the first build. An
    entry larger than the whole budget is returned but not kept, with a warning
    (once per entry) naming the budget it would need. ``clock``
    (seconds, monotonic) times how long entries sat unused.
    """

    def __init__(self, budget_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._entries: LruTable[str, _Entry] = LruTable(max_bytes=budget_bytes)
        self._lock = threading.Lock()
        self._building: dict[str, threading.Event] = {}
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._unloaded = 0
        self._too_large: set[str] = set()
        self._build_seconds = 0.0
        self._in_use: Counter[str] = Counter()
        self._scope = threading.local()

    @contextmanager
    def job_scope(self) -> Iterator[None]:
        """Mark every digest this thread asks for inside the block as in use until the block ends."""
        if getattr(self._scope, "digests", None) is not None:  # nested: the outer scope owns the marks
            yield
            return
        used: set[str] = set()
        self._scope.digests = used
        try:
            yield
        finally:
            self._scope.digests = None
            with self._lock:
                self._in_use.subtract(used)
                for digest in used:
                    if self._in_use[digest] <= 0:
                        del self._in_use[digest]

    def get_or_build(
        self, digest: str, build: Callable[[], Any], *, name: str | None = None
    ) -> tuple[Any, bool]:
        """The value for ``digest`` and whether it was a cache hit; ``name`` labels the entry in reports."""
        scope: set[str] | None = getattr(self._scope, "digests", None)
        while True:
            with self._lock:
                if scope is not None and digest not in scope:
                    scope.add(digest)
                    self._in_use[digest] += 1
                entry = self._entries.get(digest)
                if entry is not None:
                    entry.last_used = self._clock()
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
                if built:  # before waiters wake: they find it
                    self._insert_locked(digest, value, size, name or f"recipe {digest[:12]}")
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
                entries=len(self._entries), bytes=self._entries.total_bytes,
                budget_bytes=self.budget_bytes, build_seconds=self._build_seconds, unloaded=self._unloaded,
                too_large=len(self._too_large),
            )

    def models(self) -> list[CachedModel]:
        """Every entry, least recently used first."""
        with self._lock:
            now = self._clock()
            return [self._describe_locked(digest, entry, now) for digest, entry in self._entries.items()]

    def free_unused(self) -> FreeResult:
        """Drop every entry no running job uses; returns what went and what stayed."""
        with self._lock:
            now = self._clock()
            freed: list[CachedModel] = []
            kept: list[CachedModel] = []
            for digest, entry in self._entries.items():
                described = self._describe_locked(digest, entry, now)
                if described.in_use:
                    kept.append(described)
                else:
                    self._entries.pop(digest)
                    freed.append(described)
            self._unloaded += len(freed)
        return FreeResult(tuple(freed), tuple(kept))

    def drop_idle(self, idle_s: float) -> list[CachedModel]:
        """Drop the entries unused for more than ``idle_s`` seconds that no running job uses."""
        with self._lock:
            now = self._clock()
            dropped: list[CachedModel] = []
            for digest, entry in self._entries.items():
                if now - entry.last_used > idle_s and self._in_use[digest] <= 0:
                    self._entries.pop(digest)
                    dropped.append(self._describe_locked(digest, entry, now))
            self._unloaded += len(dropped)
        return dropped

    def _describe_locked(self, digest: str, entry: _Entry, now: float) -> CachedModel:
        return CachedModel(digest=digest, name=entry.name, bytes=entry.size,
                           idle_s=max(0.0, now - entry.last_used), in_use=self._in_use[digest] > 0)

    def _insert_locked(self, digest: str, value: Any, size: int, name: str) -> None:
        """Keep ``value`` (the lock is held), evicting least recently used entries over budget."""
        if not self._entries.fits(size):
            if digest not in self._too_large:
                self._too_large.add(digest)
                log.warning(
                    "%s is %.2f GiB, larger than the whole model cache (%.2f GiB): it is not kept and is "
                    "built again for every request; give the worker --cache-gb %.1f or more",
                    name, size / _GIB, self.budget_bytes / _GIB, -(-size * 10 // _GIB) / 10,
                )
            return
        evicted = self._entries.put(digest, _Entry(value, size, name, self._clock()), size)
        self._evictions += len(evicted)
