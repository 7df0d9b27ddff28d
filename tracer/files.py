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

from diffsplit.tracer.recipe import FileRef, FolderFile, folder_digest, is_sha256
from diffsplit.transport.errors import DiffsplitError

#: Store folders of a ComfyUI-style models folder; a file directly inside one keeps it as its folder.
KNOWN_FOLDERS: frozenset[str] = frozenset(
    {"checkpoints", "loras", "vae", "clip", "controlnet", "diffusers", "embeddings", "upscale_models", "unet"}
    | {"text_encoders", "diffusion_models", "configs", "genie_heads"}
)
_CHUNK_BYTES = 8 * 1024 * 1024
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".sft", ".gguf"})


class FileRefResolver(Protocol):
    """Turns a local file or folder into a :class:`FileRef`."""

    def file_ref(self, path: Path, read: tuple[Path, ...] = ()) -> FileRef:
        """The reference of ``path``, a file or model folder (``read``: the folder's files a loader read)."""
        ...


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache file is named by, or None.

    A snapshot file is a link to ``blobs/<name>``; large (LFS) files' blobs are
    named by their sha256, small files' by a git hash of another length.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and is_sha256(target.name) else None


def complete_reads(folder: Path, read: tuple[Path, ...]) -> tuple[Path, ...] | None:
    """The files read in ``folder`` when they can stand for what the loader needs, else None.

    A loader that read a config in some folder of it but none of that folder's
    weight files read them in a way the tracer did not see (a reader not in
    ``file_reads.NATIVE_READERS``): the recipe then names the whole folder.
    """
    if not read:
        return None
    read_set = set(read)
    for holder in {path.parent for path in read}:
        weights = [item for item in holder.iterdir() if item.suffix.lower() in _WEIGHT_SUFFIXES]
        if weights and not read_set.intersection(weights):
            return None
    return read


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
    """(digest, total bytes) of a model folder: the ``folder_digest`` of all its files.

    ``file_digest(path) -> str`` hashes one file (a memoizing one may be passed).
    """
    files = tuple(
        FolderFile(path.relative_to(directory).as_posix(), file_digest(path), path.stat().st_size)
        for path in directory_files(directory)
    )
    return folder_digest(files), sum(item.bytes for item in files)


class HashingFileRefs:
    """Names files by hashing them, remembering each (path, size, mtime) it has hashed."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        """The sha256 of a file, hashed once per (path, size, mtime); a hub cache blob's own name."""
        named = hub_blob_sha256(path)
        if named is not None:
            return named
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._known[key] = known
        return known

    def file_ref(self, path: Path, read: tuple[Path, ...] = ()) -> FileRef:
        """A reference named by the file's own name, in the folder it sits in when that is a store folder.

        A folder with the files its loader read (``read``) is named by those files alone.
        """
        path = Path(path).absolute()
        folder = path.parent.name if path.parent.name in KNOWN_FOLDERS else None
        listed = complete_reads(path, read) if path.is_dir() else None
        if listed is not None:
            return folder_ref(path, listed, self.sha256, folder)
        if path.is_dir():
            digest, total = directory_digest(path, self.sha256)
            return FileRef(name=path.name, sha256=digest, bytes=total, folder=folder, kind="dir")
        return FileRef(name=path.name, sha256=self.sha256(path), bytes=path.stat().st_size, folder=folder)


class StoreFileRefs:
    """Names files by the engine's model store; files outside the store are hashed."""

    def __init__(self, store: Any, fallback: HashingFileRefs | None = None) -> None:
        self.store = store
        self.fallback = fallback or HashingFileRefs()

    def file_ref(self, path: Path, read: tuple[Path, ...] = ()) -> FileRef:
        """The store's folder/name/sha256/size for ``path``, or a hashed reference outside it.

        A folder with the files its loader read (``read``) is named by those files alone.
        """
        path = Path(path).absolute()
        try:
            entry = self.store.entry(path)
        except DiffsplitError:
            return self.fallback.file_ref(path, read)
        listed = complete_reads(path, read) if path.is_dir() else None
        if listed is not None:
            return folder_ref(path, listed, self._sha256, entry.folder, entry.name)
        return FileRef(
            name=entry.name,
            sha256=entry.sha256,
            bytes=entry.bytes,
            folder=entry.folder,
            kind="dir" if path.is_dir() else "file",
        )

    def _sha256(self, path: Path) -> str:
        try:
            return str(self.store.sha256(path))
        except DiffsplitError:
            return self.fallback.sha256(path)


def folder_ref(folder: Path, read: tuple[Path, ...], sha256: Any, store_folder: str | None,
               name: str | None = None) -> FileRef:
    """A folder reference listing the files ``read`` inside ``folder`` (``sha256(path) -> str``)."""
    files = tuple(
        FolderFile(path.relative_to(folder).as_posix(), sha256(path), path.stat().st_size) for path in read
    )
    return FileRef.folder_of(name or folder.name, files, store_folder)


def file_refs_for(store: Any | None) -> FileRefResolver:
    """The resolver to use: the store's when one is given, else hashing."""
    return StoreFileRefs(store) if store is not None else HashingFileRefs()
