"""A Hugging Face cache on disk, in the hub library's own layout, made from a local model folder."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

#: The commit the cached snapshot is at (``refs/main`` names it).
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A cache under ``root`` holding ``folder`` as ``repo_id`` at ``main``; returns ``root``.

    Snapshot files link to blobs; weights are LFS files, their blobs named by sha256, small files' blobs
    by a git hash (40 hex digits), as the hub library keeps them.
    """
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        content = source.read_bytes()
        lfs = source.suffix == ".safetensors"
        name = hashlib.sha256(content).hexdigest() if lfs else hashlib.sha1(b"blob " + content).hexdigest()
        blob = blobs / name
        shutil.copyfile(source, blob)
        target = snapshot / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root
