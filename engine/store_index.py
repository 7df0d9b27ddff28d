"""The sha256 index of a model store, cached on disk as JSON.

Entries are keyed by the path relative to the store root and are trusted while
the file's *stamp* (size and mtime in nanoseconds; for a model directory a digest
of its files' stamps) is unchanged, so a multi-GB file is hashed once. Updates
are guarded by a lock; the file is rewritten atomically (temporary file +
``os.replace``) after merging what another process may have written meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = 1


@dataclass(frozen=True)
class IndexEntry:
    """What the index remembers about one file or model directory."""

    sha256: str
    bytes: int
    stamp: str


def file_stamp(path: Path) -> tuple[str, int]:
    """The freshness stamp and size of a file (follows symlinks)."""
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}", info.st_size


class HashIndex:
    """A thread-safe, disk-cached map of relative path → :class:`IndexEntry`."""

    def __init__(self, index_path: Path) -> None:
        self.index_path = index_path
        self._lock = threading.Lock()
        self._entries: dict[str, IndexEntry] | None = None
        self._key_locks: dict[str, threading.Lock] = {}

    def lookup(self, key: str, stamp: str) -> IndexEntry | None:
        """The entry for ``key`` if it was recorded with this ``stamp``."""
        with self._lock:
            entry = self._loaded().get(key)
        return entry if entry is not None and entry.stamp == stamp else None

    def fresh_entries(self) -> dict[str, IndexEntry]:
        """A snapshot of every entry (stamps not re-checked)."""
        with self._lock:
            return dict(self._loaded())

    def get_or_compute(self, key: str, stamp: str, size: int, compute: Callable[[], str]) -> IndexEntry:
        """The entry for ``key`` at ``stamp``, calling ``compute()`` for the sha256 only if needed.

        Concurrent callers for the same key wait for one computation.
        """
        with self._key_lock(key):
            known = self.lookup(key, stamp)
            if known is not None:
                return known
            entry = IndexEntry(sha256=compute(), bytes=size, stamp=stamp)
            with self._lock:
                self._loaded()[key] = entry
                self._save()
            return entry

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _loaded(self) -> dict[str, IndexEntry]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, IndexEntry]:
        try:
            document = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(document, dict) or document.get("version") != INDEX_VERSION:
            return {}
        entries: dict[str, IndexEntry] = {}
        stored = document.get("entries") if isinstance(document, dict) else None
        for key, raw in (stored if isinstance(stored, dict) else {}).items():
            try:
                entries[key] = IndexEntry(
                    sha256=str(raw["sha256"]), bytes=int(raw["bytes"]), stamp=str(raw["stamp"])
                )
            except (KeyError, TypeError, ValueError):
                continue
        return entries

    def _save(self) -> None:
        """Merge with the file on disk (ours win) and replace it atomically; caller holds the lock."""
        merged = {**self._read(), **(self._entries or {})}
        self._entries = merged
        document = {
            "version": INDEX_VERSION,
            "entries": {
                key: {"sha256": entry.sha256, "bytes": entry.bytes, "stamp": entry.stamp}
                for key, entry in sorted(merged.items())
            },
        }
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=self.index_path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump(document, stream, indent=1)
                os.replace(temporary, self.index_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError:
            # A read-only location: the index still works, in memory, for this process.
            return
