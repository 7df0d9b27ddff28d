"""Files of a Hugging Face cache, found by sha256: what a worker holds besides its model store.

The hub library keeps each repository as ``models--org--name/blobs/<hash>``
with snapshots linking to the blobs. Large (LFS) files are named by their
sha256, so they are found by name; small files (configs, tokenizer files) are
named by a git hash, so blobs of the asked size are hashed (once per path,
size and mtime). Only this machine's cache folder is read, never a path a
request named.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffsplit.tracer.files import HashingFileRefs
from diffsplit.tracer.recipe import is_sha256


def default_hub_cache() -> Path | None:
    """Where the hub library keeps its cache on this machine (``HF_HUB_CACHE``/``HF_HOME`` respected)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


class HubCacheFiles:
    """Blobs of a Hugging Face cache folder, looked up by sha256 and size."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self._hashes = HashingFileRefs()

    def _blob_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(path / "blobs" for path in self.root.iterdir()
                      if path.name.startswith(("models--", "datasets--")) and (path / "blobs").is_dir())

    def find_file(self, sha256: str, size: int) -> Path | None:
        """A blob with this content, or None."""
        folders = self._blob_folders()
        for folder in folders:
            blob = folder / sha256
            if blob.is_file() and blob.stat().st_size == size:
                return blob
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if is_sha256(entry.name) or not entry.is_file() or entry.stat().st_size != size:
                        continue
                    if self._hashes.sha256(Path(entry.path)) == sha256:
                        return Path(entry.path)
        return None
