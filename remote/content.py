"""Files a client sends by content: the worker's content cache, apart from its store.

A client that explains a model by content (``engine.untraced_adapters``: LoRA
adapters loaded outside any trace) names each file ``<sha256>.safetensors`` and,
when the worker lacks it, uploads it with ``content`` set. Those files land
here, in a folder the worker owns (``--content-dir``, default a fresh temporary
folder removed when the worker stops), never in the user's store; the same
chunked receiver as store uploads takes them (its size, count and disk limits,
the sha256 checked before a file is kept), and a recipe finds one by its sha256
alone. Only ``.safetensors`` files in the folders recipes may name are taken.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

from diffsplit.remote.errors import BadRequest
from diffsplit.remote.uploads import UploadLimits, UploadReceiver
from diffsplit.tracer.recipe import FileRef
from diffsplit.transport.worker_ops import UploadChunk

#: The folders a content file may be named in (what untraced adapters use).
CONTENT_FOLDERS = frozenset({"loras"})
CONTENT_SUFFIX = ".safetensors"


class ContentFiles:
    """The content cache in ``root`` (None: a fresh temporary folder, removed by :meth:`close`)."""

    def __init__(self, root: Path | None, limits: UploadLimits) -> None:
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="diffsplit-content-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._receiver = UploadReceiver(self.root, limits)

    def receive(self, chunk: UploadChunk, client: Hashable) -> Path | None:
        """Apply one content chunk; the file's path once the last chunk is in and its sha256 checked."""
        if chunk.folder not in CONTENT_FOLDERS:
            raise BadRequest(f"upload: content files go in {', '.join(sorted(CONTENT_FOLDERS))}/, "
                             f"not {chunk.folder!r}")
        if chunk.name != f"{chunk.sha256}{CONTENT_SUFFIX}":
            raise BadRequest("upload: a content file is named by its sha256 (<sha256>.safetensors)")
        return self._receiver.receive(chunk, client)

    def find(self, ref: FileRef) -> Path | None:
        """The cached file with ``ref``'s sha256, or None (its name was checked against it on arrival)."""
        if ref.kind != "file" or ref.folder not in CONTENT_FOLDERS:
            return None
        path = self.root / str(ref.folder) / f"{ref.sha256}{CONTENT_SUFFIX}"
        return path if path.is_file() and path.stat().st_size == ref.bytes else None

    def close(self) -> None:
        """Remove the folder when the worker made it (a folder given with --content-dir stays)."""
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
