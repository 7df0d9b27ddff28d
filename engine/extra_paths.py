"""ComfyUI's ``extra_model_paths.yaml``: more folders for each kind of model.

The file ComfyUI users already have looks like::

    comfyui:
        base_path: /data/ComfyUI/
        checkpoints: models/checkpoints/
        loras: |
            models/loras
            models/more_loras
    a111:
        base_path: ../stable-diffusion-webui/
        checkpoints: models/Stable-diffusion
        vae: models/VAE

Each top-level section has an optional ``base_path`` (relative to the yaml
file's folder; ``~`` expands) and, per model folder, one path or several (a
block of lines or a list), relative to ``base_path``. ``is_default`` is
ignored. ComfyUI's newer folder names are read as the ones diffsplit uses
(``unet``/``diffusion_models``, ``clip``/``text_encoders``). :func:`load_extra_paths`
returns folder → directories, in file order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.store import ModelStore

#: Folder names that ComfyUI treats as one (the second is the one diffsplit lists).
FOLDER_ALIASES: Mapping[str, str] = {"text_encoders": "clip", "diffusion_models": "unet"}
_IGNORED_KEYS = frozenset({"base_path", "is_default"})


def load_extra_paths(path: Path | str) -> dict[str, list[Path]]:
    """Folder name → extra directories, from an ``extra_model_paths.yaml``; ModelFileError when malformed."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ModelFileError(f"{path}: expected sections of folder paths, got {type(document).__name__}")
    folders: dict[str, list[Path]] = {}
    for section, entries in document.items():
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise ModelFileError(f"{path}: section {section!r} must map folder names to paths")
        base = _base_path(path, section, entries.get("base_path"))
        for folder, value in entries.items():
            if folder in _IGNORED_KEYS:
                continue
            name = FOLDER_ALIASES.get(str(folder), str(folder))
            for entry in _paths(path, section, folder, value):
                directory = Path(entry).expanduser()
                absolute = directory if directory.is_absolute() else base / directory
                folders.setdefault(name, []).append(absolute)
    return folders


def _base_path(path: Path, section: Any, value: Any) -> Path:
    if value is None:
        return path.parent.absolute()
    if not isinstance(value, str):
        raise ModelFileError(f"{path}: base_path of section {section!r} must be a string")
    base = Path(value).expanduser()
    return base if base.is_absolute() else (path.parent / base).absolute()


def _paths(path: Path, section: Any, folder: Any, value: Any) -> list[str]:
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value if item.strip()]
    raise ModelFileError(f"{path}: {section}.{folder} must be a path, lines of paths or a list of paths")


def open_store(models: Path | str, extra_model_paths: Path | str | None = None) -> ModelStore:
    """The model store of ``--models`` with the folders of ``--extra-model-paths`` (if given)."""
    extra = load_extra_paths(extra_model_paths) if extra_model_paths else None
    return ModelStore(Path(models), extra_folders=extra)
