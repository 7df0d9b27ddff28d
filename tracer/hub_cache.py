"""Where a loader's path argument lives on this machine: a local path, relative or not, or a hub snapshot.

``from_pretrained("models/diffusers/tiny-sd15")`` names a folder relative to
the working directory; ``from_pretrained("org/model")`` names a hub repository
that the library reads from the local Hugging Face cache. Both are files on
this machine, so both can be named by sha256 in a recipe. The cache is only
ever read (``local_files_only``): nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``org/name`` or ``name``, as the hub spells repository ids.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def existing_path(value: str) -> Path | None:
    """The absolute path ``value`` names when it exists here (relative paths from the working directory)."""
    if value and os.path.exists(value):
        return Path(value).absolute()
    return None


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The local snapshot folder of a hub repository, or None when it is not in this machine's cache."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    path = Path(folder)
    return path if path.is_dir() else None


def loader_path(value: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The local file or folder a loader reads for ``value``: an existing path first, then the hub cache."""
    return existing_path(value) or cached_snapshot(value, revision, cache_dir)
