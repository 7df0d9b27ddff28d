"""The network file a preprocessor node names, where the pack's ``.pth`` and a ``.safetensors`` of the
same weights are twins.

The common preprocessor pack's nodes read fixed ``.pth`` files (``body_pose_model.pth``,
``sk_model.pth``) and shared workflows name none; diffsplit's tiny set and converted files are
``.safetensors``. A name that is not in the store is looked up once more under its twin suffix, so
either file serves the pack's default. Both lookups go through ``lookup`` (the node's
``ctx.model_path``), so the store's rules apply to each and an offloaded node reads the file the
client resolved (``engine.run_files`` lists it under the name the node asks for).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

from diffsplit.engine.errors import ModelFileError

TWIN_SUFFIXES = (".pth", ".safetensors")

ModelLookup = Callable[[str, str], Path]


def twin_name(name: str) -> str | None:
    """``name`` with its other twin suffix, or None when it has neither."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in TWIN_SUFFIXES:
        return None
    other = TWIN_SUFFIXES[1 - TWIN_SUFFIXES.index(suffix)]
    return name[: -len(suffix)] + other


def find_model_file(lookup: ModelLookup, folder: str, name: str) -> Path:
    """``lookup(folder, name)``, or its twin's file when only the twin exists; the error for ``name``
    otherwise."""
    try:
        return lookup(folder, name)
    except ModelFileError as missing:
        twin = twin_name(name)
        if twin is None:
            raise
        try:
            return lookup(folder, twin)
        except ModelFileError:
            raise missing from None
