"""Naming local model files the way a worker's store knows them: folder, name, sha256, size.

Two resolvers: :class:`StoreFileRefs` asks the engine's model store (any object
with ``entry(path)`` returning ``folder, name, sha256, bytes`` — duck-typed, the
tracer does not import the engine) and falls back to hashing for files outside
it; :class:`HashingFileRefs` hashes files itself, memoized by (path, size,
mtime). A diffusers folder is named by a digest over its files, computed exactly
as the store computes it, so a worker can find the folder by sha256.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Protocol

from diffsplit.tracer.recipe import FileRef
from diffsplit.transport.errors import DiffsplitError

#: Store folders of a ComfyUI-style models folder; a file directly inside one keeps it as its folder.
KNOWN_FOLDERS: frozenset[str] = frozenset(
    {"checkpoints", "loras", "vae", "clip", "controlnet", "diffusers", "embeddings", "upscale_models", "unet"}
    | {"text_encoders", "diffusion_models", "configs", "genie_heads"}
)
_CHUNK_BYTES = 8 * 1024 * 1024


class FileRefResolver(Protocol):
    """Turns a local file or folder into a :class:`FileRef`."""

    def file_ref(self, path: Path) -> FileRef:
        """The reference of ``path`` (a file or a model folder)."""
        ...


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def directory_files(directory: Path) -> list[Path]:
    """The files of a model folder, recursively, hidden ones left out, in the store's order."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def directory_digest(directory: Path, file_digest: Any = file_sha256) -> tuple[str, int]:
    """(digest, total bytes) of a model folder: sha256 over ``"<relative path>\\0<sha256>\\n"`` lines.

    ``file_digest(path) -> str`` hashes one file (a memoizing one may be passed).
    """
    lines = []
    total = 0
    for path in directory_files(directory):
        lines.append(f"{path.relative_to(directory).as_posix()}\0{file_digest(path)}\n")
        total += path.stat().st_size
    return hashlib.sha256("".join(lines).encode()).hexdigest(), total


class HashingFileRefs:
    """Names files by hashing them, remembering each (path, size, mtime) it has hashed."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        """The sha256 of a file, hashed once per (path, size, mtime)."""
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._known[key] = known
        return known

    def file_ref(self, path: Path) -> FileRef:
        """A reference named by the file's own name, in the folder it sits in when that is a store folder."""
        path = Path(path).absolute()
        folder = path.parent.name if path.parent.name in KNOWN_FOLDERS else None
        if path.is_dir():
            digest, total = directory_digest(path, self.sha256)
            return FileRef(name=path.name, sha256=digest, bytes=total, folder=folder, kind="dir")
        return FileRef(name=path.name, sha256=self.sha256(path), bytes=path.stat().st_size, folder=folder)


class StoreFileRefs:
    """Names files by the engine's model store; files outside the store are hashed."""

    def __init__(self, store: Any, fallback: HashingFileRefs | None = None) -> None:
        self.store = store
        self.fallback = fallback or HashingFileRefs()

    def file_ref(self, path: Path) -> FileRef:
        """The store's folder/name/sha256/size for ``path``, or a hashed reference outside it."""
        path = Path(path).absolute()
        try:
            entry = self.store.entry(path)
        except DiffsplitError:
            return self.fallback.file_ref(path)
        return FileRef(
            name=entry.name,
            sha256=entry.sha256,
            bytes=entry.bytes,
            folder=entry.folder,
            kind="dir" if path.is_dir() else "file",
        )


def file_refs_for(store: Any | None) -> FileRefResolver:
    """The resolver to use: the store's when one is given, else hashing."""
    return StoreFileRefs(store) if store is not None else HashingFileRefs()
