"""The manifest of ``diffsplit batch``: one JSON line per finished item, appended as it finishes.

A line says what the item was (its key, line, prompt, seed and the digest of
what it asked for), how it went (``ok`` or ``failed`` with the error), what it
wrote (paths relative to the manifest's folder), where each offloaded node ran
and how long it took. Lines are appended and flushed one at a time, so an
interrupted batch keeps every line it finished; on resume an item whose last
line is ``ok``, with the same digest and its images still there, is not redone.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffsplit.batch_items import BatchItem, BatchItemsError

OK = "ok"
FAILED = "failed"


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line."""

    item: str
    line: int
    digest: str
    status: str
    prompt: str | None = None
    seed: int | None = None
    outputs: tuple[str, ...] = ()
    workers: Mapping[str, str] = field(default_factory=dict)  # node id -> address, "local" or "fallback"
    times: Mapping[str, float] = field(default_factory=dict)  # total_s, then one per node id that ran
    error: str | None = None

    def to_json(self) -> str:
        document = {key: value for key, value in asdict(self).items() if value is not None}
        document["outputs"] = list(self.outputs)
        return json.dumps(document, sort_keys=False)


class Manifest:
    """The manifest file of one output folder; appends are thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._checked_end = False

    def finished(self) -> dict[str, ManifestEntry]:
        """The last entry of each item recorded so far (an absent file: none)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BatchItemsError(f"cannot read the manifest {self.path}: {exc.strerror or exc}") from None
        entries: dict[str, ManifestEntry] = {}
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = _entry(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                if number == len(lines) and not text.endswith("\n"):
                    break  # the last line was cut off by an interruption: that item is redone
                raise BatchItemsError(f"{self.path} line {number} is not a manifest entry ({exc}); "
                                      "fix or remove it, or pass --restart to start over") from None
            entries[entry.item] = entry
        return entries

    def is_done(self, item: BatchItem, entry: ManifestEntry | None) -> bool:
        """Whether ``entry`` finished ``item`` as it is now, with its images still on disk."""
        if entry is None or entry.status != OK or entry.digest != item.digest:
            return False
        return all((self.path.parent / output).is_file() for output in entry.outputs)

    def append(self, entry: ManifestEntry) -> None:
        """Add one line and push it to disk before returning."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._checked_end:
                self._drop_cut_line()
                self._checked_end = True
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(entry.to_json() + "\n")
                stream.flush()
                os.fsync(stream.fileno())

    def _drop_cut_line(self) -> None:
        """Remove a last line an interruption left half written (its item is redone)."""
        try:
            with self.path.open("r+b") as stream:
                data = stream.read()
                if data and not data.endswith(b"\n"):
                    stream.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            return

    def relative(self, paths: Sequence[Path]) -> tuple[str, ...]:
        """``paths`` as the manifest names them: relative to its folder where they are inside it."""
        base = self.path.parent.resolve()
        named = []
        for path in paths:
            resolved = path.resolve()
            named.append(str(resolved.relative_to(base)) if resolved.is_relative_to(base) else str(resolved))
        return tuple(named)


def _entry(document: Any) -> ManifestEntry:
    if not isinstance(document, dict):
        raise TypeError("not an object")
    return ManifestEntry(
        item=str(document["item"]), line=int(document["line"]), digest=str(document["digest"]),
        status=str(document["status"]), prompt=document.get("prompt"), seed=document.get("seed"),
        outputs=tuple(str(path) for path in document.get("outputs", ())),
        workers=dict(document.get("workers", {})), times=dict(document.get("times", {})),
        error=document.get("error"),
    )
