"""A model folder assembled from files found by sha256, in whatever layout this machine keeps them.

A folder reference that lists its files (``FileRef.files``: what the client's
loader read) is rebuilt here as a *view*: a folder with the recorded layout
whose entries link to the files this machine holds with the same sha256 —
anywhere in its model store (a model file, or a file inside any model
folder), in its Hugging Face cache, wherever a :data:`FileFinder` looks.
A folder with extra files, another layout or another name serves the same
recipe. Views are named by the reference's digest and the files they link to,
so a view is never changed once made: the same files give the same view, and a
changed file gives a new one. Entries are symbolic links (a hard link, then a
copy, where links cannot be made).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.user_cache import cache_root
from diffsplit.tracer.recipe import FileRef, FolderFile

#: Finds a file of this sha256 and size on this machine, or None.
FileFinder = Callable[[str, int], Path | None]


class MissingFolderFile(ModelFileError):
    """A file a folder reference lists is on none of this machine's finders."""

    def __init__(self, ref: FileRef, item: FolderFile) -> None:
        self.ref = ref
        self.item = item
        self.name = f"{ref.store_name}/{item.path}"
        super().__init__(f"{self.name} (sha256 {item.sha256}, {item.bytes} bytes) is not on this machine")


def default_views_root() -> Path:
    """Where views are made when no folder is given: the user cache."""
    return cache_root() / "folder-views"


class FolderViews:
    """Makes and reuses views under ``root`` (created when first needed)."""

    def __init__(self, finders: Sequence[FileFinder], root: Path | None = None) -> None:
        self.finders = tuple(finders)
        self.root = Path(root) if root is not None else default_views_root()

    def find(self, item: FolderFile) -> Path | None:
        """This machine's file with ``item``'s content, from the first finder that has one."""
        for finder in self.finders:
            found = finder(item.sha256, item.bytes)
            if found is not None:
                return found
        return None

    def view(self, ref: FileRef) -> Path:
        """The folder ``ref`` lists, assembled here; MissingFolderFile names the first file not found."""
        if not ref.files:
            raise ValueError("only a folder reference that lists its files can be assembled")
        targets: list[tuple[FolderFile, Path]] = []
        for item in ref.files:
            found = self.find(item)
            if found is None:
                raise MissingFolderFile(ref, item)
            targets.append((item, Path(os.path.abspath(found))))
        key = hashlib.sha256(ref.sha256.encode())
        for item, target in targets:
            info = target.stat()
            key.update(f"\n{item.path}\0{target}\0{info.st_size}:{info.st_mtime_ns}".encode())
        view = self.root / key.hexdigest()[:40]
        if view.is_dir():
            return view
        self.root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
        try:
            for item, target in targets:
                entry = building / item.path  # item.path is checked relative (no '..', no absolute path)
                entry.parent.mkdir(parents=True, exist_ok=True)
                _link(target, entry)
            with contextlib.suppress(FileExistsError, OSError):
                building.rename(view)  # another thread or process may have made the same view meanwhile
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
        if not view.is_dir():
            raise ModelFileError(f"cannot make a folder for {ref.store_name} under {self.root}")
        return view


def _link(target: Path, entry: Path) -> None:
    try:
        entry.symlink_to(target)
    except OSError:
        try:
            os.link(target, entry)
        except OSError:
            shutil.copyfile(target, entry)
