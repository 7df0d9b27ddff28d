"""Hashing the worker's model store in the background at start, so no request waits for sha256.

A request names files by sha256; the store finds them through its on-disk
index, hashing a model the first time it is asked for (1–3 s per GB). The
worker starts a :class:`StoreIndexer` as it starts serving: one thread walks
every listed model, hashes what the index does not know fresh, and logs its
progress (at most every ``LOG_EVERY_S``, and a summary at the end). A request
for a model the thread is hashing waits for that one hash (the index has a
lock per file), never hashes it twice. Stopping the worker stops the walk
between two models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from diffsplit.engine.store import IndexSummary, ModelStore

log = logging.getLogger(__name__)
LOG_EVERY_S = 5.0
_GIB = 1 << 30


class StoreIndexer:
    """One background walk over a store's models (``ModelStore.index_all``)."""

    def __init__(self, store: ModelStore, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._summary: IndexSummary | None = None
        self._done = threading.Event()

    def start(self) -> None:
        """Start the walk in a thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="diffsplit-index", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the model being hashed now; wait up to ``timeout_s`` for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait(self, timeout_s: float | None = None) -> IndexSummary | None:
        """The summary once the walk ended (None if it did not within ``timeout_s``)."""
        self._done.wait(timeout_s)
        return self._summary

    def _run(self) -> None:
        started = self._clock()
        last_logged = started
        log.info("indexing the model store (sha256 of each model not indexed yet)")

        def progress(done: int, total: int, name: str, total_bytes: int) -> None:
            nonlocal last_logged
            now = self._clock()
            if now - last_logged >= LOG_EVERY_S and done < total:
                last_logged = now
                log.info("indexing the model store: %d/%d models (%.2f GiB), last %s",
                         done, total, total_bytes / _GIB, name)

        try:
            summary = self.store.index_all(progress=progress, stop=self._stop.is_set)
        except OSError as exc:  # the store vanished or cannot be listed: lookups will say so
            log.warning("indexing the model store failed: %s", exc)
            self._done.set()
            return
        self._summary = summary
        elapsed = self._clock() - started
        state = "indexed" if summary.complete else "stopped indexing after"
        log.info("%s %d model(s) (%.2f GiB) in %.1f s", state, summary.models, summary.bytes / _GIB, elapsed)
        if summary.unreadable:
            log.warning("%d model(s) cannot be read: %s", len(summary.unreadable),
                        ", ".join(summary.unreadable[:5]))
        self._done.set()
