"""A ComfyUI-style models folder, with names that never escape it and an on-disk sha256 index.

Layout: ``<root>/checkpoints``, ``loras``, ``vae``, ``clip``, ``controlnet``,
``diffusers``, ``embeddings``, ``upscale_models``, ``text_encoders``, ``preprocessors``,
``diffusion_models``, ``configs`` (other folders work too). As in ComfyUI,
``text_encoders`` and ``clip`` list one set of models (both directories), and so
do ``diffusion_models`` and ``unet`` (:data:`FOLDER_GROUPS`); ``configs`` lists
``.yaml`` files.
A model is either a weight file (``.safetensors .ckpt .pt .pth .bin .sft``) or a
*model directory*: a directory holding ``model_index.json`` (a diffusers
pipeline) or ``config.json`` (one diffusers/transformers model), listed as one
name and not descended into. Names use ``/`` between sub-folders.

The sha256 of a model directory is a digest over its files' relative paths and
sha256s (one ``"<path>\\0<sha256>\\n"`` line per file, sorted by path).

Real folders, as users keep them:

- the owner may place symbolic links to models on other drives; they are
  listed and followed, and a name from a request resolves *only* through the
  listing (never ``..``, absolute paths or a link the listing does not show);
- names saved on Windows (``SD1.5\\model.safetensors``) are read with ``/``;
- ``extra_folders`` (from ComfyUI's ``extra_model_paths.yaml``, see
  :mod:`.extra_paths`) adds directories to a folder, searched after the root's;
- the sha256 index lives in the user cache (``$DIFFSPLIT_CACHE``), never in
  the models folder, which may be read-only or shared.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.store_index import HashIndex, IndexEntry, file_stamp
from diffsplit.engine.user_cache import cache_root
from diffsplit.tracer.files import directory_files, file_sha256
from diffsplit.tracer.recipe import FolderFile, folder_digest

MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints",
    "loras",
    "vae",
    "clip",
    "controlnet",
    "diffusers",
    "embeddings",
    "upscale_models",
    "text_encoders",
    "diffusion_models",
    "unet",
    "configs",
    "clip_vision",
    "genie_heads",
    "preprocessors",
)
MODEL_EXTENSIONS: frozenset[str] = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"})
#: ComfyUI folder names that list the same models, with the directories searched in ComfyUI's order
#: (``text_encoders`` is also the legacy ``clip``; ``diffusion_models`` also the legacy ``unet``).
FOLDER_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "text_encoders": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "unet": ("unet", "diffusion_models"),
})  # fmt: skip
#: Folders whose files are not weights: ComfyUI's ``configs`` lists LDM ``.yaml`` configs.
FOLDER_EXTENSIONS: Mapping[str, frozenset[str]] = MappingProxyType({"configs": frozenset({".yaml"})})
MODEL_DIRECTORY_MARKERS: tuple[str, ...] = ("model_index.json", "config.json")
_MAX_LISTED = 30
_NO_ENTRY = IndexEntry(sha256="", bytes=0, stamp="")


@dataclass(frozen=True)
class StoreEntry:
    """One model in the store: its folder, its name in that folder, sha256 and size in bytes."""

    folder: str
    name: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class IndexSummary:
    """What :meth:`ModelStore.index_all` went through."""

    models: int
    bytes: int
    unreadable: tuple[str, ...]
    #: False when it was stopped before the last model
    complete: bool


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` is not a plain relative name (``a/b.safetensors``), or None if it is."""
    if not isinstance(name, str) or not name:
        return "empty name"
    if "\x00" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if any(part in {"", ".", ".."} for part in name.split("/")):
        return "has an empty, '.' or '..' path component"
    return None


def normalize_name(name: str) -> str:
    """A model name with Windows separators read as ``/`` (names saved by ComfyUI on Windows)."""
    return name.replace("\\", "/") if isinstance(name, str) else name


def path_inside(root: Path, name: str, *, boundary: Path | None = None) -> Path:
    """``root / name`` after checking that ``name`` is plain and that no symlink leads out.

    "Out" means outside ``boundary`` (default: ``root``). Raises ValueError with
    the reason otherwise. The path need not exist.
    """
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise ValueError(f"{name!r} {reason}")
    candidate = root / name
    limit = boundary if boundary is not None else root
    if not candidate.resolve().is_relative_to(limit.resolve()):
        raise ValueError(f"{name!r} leads outside {limit} through a symbolic link")
    return candidate


def folder_group(folder: str) -> tuple[str, ...]:
    """The folder names whose directories list the models of ``folder`` (itself, or its ComfyUI group)."""
    return FOLDER_GROUPS.get(folder, (folder,))


def is_model_directory(path: Path) -> bool:
    """Whether ``path`` is a directory holding a diffusers/transformers model."""
    return path.is_dir() and any((path / marker).is_file() for marker in MODEL_DIRECTORY_MARKERS)


class ModelStore:
    """A models folder: listing, safe resolution, sha256 index and lookup by hash."""

    def __init__(
        self,
        root: Path | str,
        *,
        index_path: Path | None = None,
        extra_folders: Mapping[str, Sequence[Path]] | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise ModelFileError(f"model store {self.root} is not a directory")
        self.extra_folders = {
            folder: tuple(Path(path).absolute() for path in paths)
            for folder, paths in (extra_folders or {}).items()
        }
        for folder in self.extra_folders:
            if unsafe_name_reason(folder) is not None or "/" in folder:
                raise ModelFileError(f"{folder!r} is not a model folder name")
        self._index = HashIndex(index_path or self._default_index_path())

    @property
    def index_path(self) -> Path:
        """Where the sha256 index is cached."""
        return self._index.index_path

    def _default_index_path(self) -> Path:
        root_digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return cache_root() / "store-index" / f"{root_digest}.json"

    def folders(self) -> list[str]:
        """The model folders present in the store (the root's and the extra ones), sorted."""
        present = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        present |= {folder for folder, paths in self.extra_folders.items() if any(p.is_dir() for p in paths)}
        return sorted(present)

    def names(self, folder: str) -> list[str]:
        """The model names in ``folder`` (sorted; files and model directories, '/'-separated)."""
        return sorted(self._listed(folder))

    def _listed(self, folder: str) -> dict[str, Path]:
        """Name → path of every model in ``folder``; the root's folder wins over extra ones."""
        found: dict[str, Path] = {}
        extensions = FOLDER_EXTENSIONS.get(folder, MODEL_EXTENSIONS)
        for base in self._bases(folder):
            for name, path in _walk_models(base, extensions).items():
                found.setdefault(name, path)
        return found

    def _bases(self, folder: str) -> list[Path]:
        group = folder_group(folder)
        roots = [self._folder_path(name) for name in group]
        return [*roots, *(path for name in group for path in self.extra_folders.get(name, ()))]

    def resolve(self, folder: str, name: str) -> Path:
        """The path of model ``name`` in ``folder``; a ModelFileError listing what exists otherwise.

        Only names the listing shows resolve (a model file, a model directory,
        or a file or model inside a listed model directory).
        """
        self._folder_path(folder)
        name = normalize_name(name)
        reason = unsafe_name_reason(name)
        if reason is not None:
            raise ModelFileError(
                f'"{name}" is not a valid name in {folder}/: {name!r} {reason}; '
                f"available: {self._listing(folder)}"
            )
        path = self._listed_path(folder, name)
        if path is None:
            raise ModelFileError(f'"{name}" not found in {folder}/; available: {self._listing(folder)}')
        return path

    def _listed_path(self, folder: str, name: str) -> Path | None:
        listed = self._listed(folder)
        if name in listed:
            return listed[name]
        parts = name.split("/")
        if any(part.startswith(".") for part in parts):
            return None
        for cut in range(len(parts) - 1, 0, -1):
            holder = listed.get("/".join(parts[:cut]))
            if holder is not None and holder.is_dir():
                inner = holder.joinpath(*parts[cut:])
                is_model = inner.is_file() or is_model_directory(inner)
                return inner if is_model and inner.resolve().is_relative_to(holder.resolve()) else None
        return None

    def sha256(self, path: Path | str) -> str:
        """The sha256 of a model file or directory in the store (from the index when fresh)."""
        return self._indexed(*self._located(Path(path))).sha256

    def entry(self, path: Path | str) -> StoreEntry:
        """Folder, name, sha256 and size of a model file or directory in the store."""
        relative, located = self._located(Path(path))
        folder, _, name = relative.partition("/")
        indexed = self._indexed(relative, located)
        return StoreEntry(folder=folder, name=name, sha256=indexed.sha256, bytes=indexed.bytes)

    def index_all(
        self,
        *,
        progress: Callable[[int, int, str, int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> IndexSummary:
        """Hash every listed model the index does not know fresh (at a worker's start).

        ``progress(done, total, "folder/name", bytes)`` is told after each model;
        ``stop()`` is asked before each and ends the walk early when true. A model
        that cannot be read is counted in ``unreadable`` (lookups report it later).
        """
        listed = sorted(self._every_listed(self.folders()).items())
        done = total_bytes = 0
        unreadable: list[str] = []
        for relative, path in listed:
            if stop is not None and stop():
                break
            try:
                total_bytes += self._indexed(relative, path).bytes
            except ModelFileError:
                unreadable.append(relative)
            done += 1
            if progress is not None:
                progress(done, len(listed), relative, total_bytes)
        return IndexSummary(models=done, bytes=total_bytes, unreadable=tuple(unreadable),
                            complete=done == len(listed))

    def find(
        self,
        *,
        sha256: str | None = None,
        name: str | None = None,
        folder: str | None = None,
        size: int | None = None,
    ) -> Path:
        """A model by sha256 first (index, then ``name``, then every candidate), else by name.

        With ``sha256`` the file's content must match; ``name`` alone returns the
        named model from ``folder`` (or the only folder holding it). ``size``
        narrows the candidates that need hashing. Raises ModelFileError.
        """
        if sha256 is None and name is None:
            raise ValueError("find() needs sha256= or name=")
        folders = [folder] if folder is not None else self.folders()
        if sha256 is None:
            return self._find_by_name(str(name), folders)
        wanted = sha256.lower()
        listed = self._every_listed(folders)  # one walk
        indexed_hits = [
            relative
            for relative, entry in sorted(self._index.fresh_entries().items())
            if entry.sha256 == wanted and relative in listed
            and self._holds(relative, listed[relative], wanted)
        ]
        if indexed_hits:
            named = [relative for relative in indexed_hits if relative.partition("/")[2] == name]
            return listed[(named or indexed_hits)[0]]
        named_first = sorted(listed, key=lambda relative: (relative.partition("/")[2] != name, relative))
        for relative in named_first:
            if self._holds(relative, listed[relative], wanted, size):
                return listed[relative]
        raise ModelFileError(
            f"no model with sha256 {wanted} in {', '.join(f + '/' for f in folders) or 'the store'}"
            + (f" (a model named {name!r} was looked for too)" if name else "")
        )

    def find_file(self, sha256: str, size: int) -> Path | None:
        """Any file of the store with this content: a model file, or a file inside a model folder.

        The index answers first; files it does not know with this size are hashed (and indexed).
        None when the store holds no such file.
        """
        wanted = sha256.lower()
        files = dict(self._every_file(self._every_listed(self.folders())))
        known = self._index.fresh_entries()
        indexed = [relative for relative in sorted(files) if known.get(relative, _NO_ENTRY).sha256 == wanted]
        # indexed files first; then the others of this size (hashed only when the index has no fresh entry)
        for relative in [*indexed, *sorted(set(files) - set(indexed))]:
            if self._holds(relative, files[relative], wanted, size):
                return files[relative]
        return None

    @staticmethod
    def _every_file(listed: Mapping[str, Path]) -> Iterator[tuple[str, Path]]:
        """``folder/name`` of each listed model file, ``folder/name/inner`` of each file in listed folders."""
        for relative, path in listed.items():
            if path.is_dir():
                for inner in directory_files(path):
                    if inner.resolve().is_relative_to(path.resolve()):
                        yield f"{relative}/{inner.relative_to(path).as_posix()}", inner
            else:
                yield relative, path

    def _every_listed(self, folders: Sequence[str]) -> dict[str, Path]:
        """``folder/name`` → path of every model the listing shows in ``folders``."""
        return {f"{folder}/{name}": path for folder in folders for name, path in self._listed(folder).items()}

    def _holds(self, relative: str, path: Path, sha256: str, size: int | None = None) -> bool:
        """Whether the listed model ``relative`` has this sha256 (and size); unreadable ones do not."""
        try:
            if size is not None and self._size(path) != size:
                return False
            return self._indexed(relative, path).sha256 == sha256
        except (ModelFileError, OSError):
            return False

    def _find_by_name(self, name: str, folders: list[str]) -> Path:
        name = normalize_name(name)
        holders = [f for f in folders if name in self.names(f)]
        if len({self.resolve(f, name) for f in holders}) == 1:  # one folder, or one group (clip, unet)
            return self.resolve(holders[0], name)
        if not holders:
            if len(folders) == 1:
                return self.resolve(folders[0], name)
            raise ModelFileError(f'"{name}" not found in any of {", ".join(f + "/" for f in folders)}')
        raise ModelFileError(f'"{name}" is in several folders ({", ".join(holders)}); name the folder')

    def _folder_path(self, folder: str) -> Path:
        if not isinstance(folder, str) or unsafe_name_reason(folder) is not None or "/" in folder:
            raise ModelFileError(f"{folder!r} is not a model folder name")
        return self.root / folder

    def _listing(self, folder: str) -> str:
        names = self.names(folder)
        shown = ", ".join(names[:_MAX_LISTED])
        more = f", … ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
        return (shown + more) or "(none)"

    def _located(self, path: Path) -> tuple[str, Path]:
        """``folder/name`` of a model path the listing shows (root or extra folder), and the path."""
        absolute = Path(os.path.abspath(path if path.is_absolute() else self.root / path))
        inside = absolute.is_relative_to(self.root)
        for folder in self.folders():
            for base in self._bases(folder):
                if absolute.is_relative_to(base) and absolute != base:
                    inside = True
                    name = absolute.relative_to(base).as_posix()
                    if self._listed_path(folder, name) == absolute:
                        return f"{folder}/{name}", absolute
        # the store's own root is never named: these texts may reach a peer
        if not inside:
            raise ModelFileError(f"{path} is not inside the model store")
        raise ModelFileError(f"{path} is not a model the store lists (no such model file or model folder)")

    def _indexed(self, relative: str, path: Path) -> IndexEntry:
        """The index entry of the listed model ``relative`` at ``path`` (hashed when stale).

        A file that cannot be read is a ModelFileError naming it by ``relative`` (never the local path).
        """
        try:
            if path.is_dir():
                return self._directory_entry(path, relative)
            stamp, size = file_stamp(path)
            return self._index.get_or_compute(relative, stamp, size, lambda: file_sha256(path))
        except OSError as exc:
            raise ModelFileError(f"{relative} cannot be read: {exc.strerror or type(exc).__name__}") from None

    def _directory_entry(self, directory: Path, relative: str) -> IndexEntry:
        files = []
        for file_path in directory_files(directory):
            inner = file_path.relative_to(directory).as_posix()
            stamp, size = file_stamp(file_path)
            entry = self._index.get_or_compute(f"{relative}/{inner}", stamp, size,
                                               lambda p=file_path: file_sha256(p))
            files.append(FolderFile(inner, entry.sha256, size))
        total = sum(item.bytes for item in files)
        return IndexEntry(sha256=folder_digest(tuple(files)), bytes=total, stamp="directory")

    @staticmethod
    def _size(path: Path) -> int:
        if path.is_dir():
            return sum(p.stat().st_size for p in directory_files(path))
        return path.stat().st_size


def _walk_models(base: Path, extensions: frozenset[str] = MODEL_EXTENSIONS) -> dict[str, Path]:
    """Name → path of the model files (with ``extensions``) and model directories under ``base``.

    Links are followed, each directory once.
    """
    if not base.is_dir():
        return {}
    found: dict[str, Path] = {}
    visited: set[Path] = set()
    for directory, subdirs, files in os.walk(base, followlinks=True):
        here = Path(directory)
        real = here.resolve()
        if real in visited:
            subdirs[:] = []
            continue
        visited.add(real)
        relative = here.relative_to(base).as_posix()
        if here != base and is_model_directory(here):
            found[relative] = here
            subdirs[:] = []
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for file_name in files:
            path = here / file_name
            if not file_name.startswith(".") and path.suffix.lower() in extensions and path.is_file():
                found[file_name if here == base else f"{relative}/{file_name}"] = path
    return found
