"""Textual-inversion embedding files, read the way ComfyUI reads them.

Formats (ComfyUI's ``load_embed``):

- safetensors with ``emb_params`` (A1111 / SD 1.x) or ``clip_l`` + ``clip_g``
  (SDXL: each text encoder takes its own key), or any single tensor;
- ``.pt`` / ``.bin`` with ``string_to_param`` (A1111, the first parameter is
  used), a list of dicts (every tensor of the encoder's width, concatenated),
  a dict of tensors, or a bare tensor. These are read **only** with
  ``torch.load(weights_only=True)``: a pickle that holds anything but tensors
  and plain containers is refused, never run. (ComfyUI's raw-zip fallback for
  files that fail this is not offered.)

Choosing the vectors of one encoder (``key`` is ``clip_l`` or ``clip_g``):
``string_to_param`` first, then the list form, then ``key``, then a LoRA-bundled
embedding (``bundle_emb.*.string_to_param.*``, then ``bundle_emb.*.<key>``),
then the file's first tensor. The result is ``[n, width]`` float32 in
allocator-owned memory; a width other than the encoder's is an error here
(ComfyUI warns and drops the vectors at encode time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.tracer.owned_memory import owned_tensor

#: Suffixes read as safetensors; everything else goes through ``torch.load(weights_only=True)``.
SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
BUNDLE_PREFIX = "bundle_emb."
STRING_TO_PARAM = "string_to_param"


@dataclass(frozen=True, eq=False)
class EmbeddingFile:
    """The tensors of one embedding file, in the shape ComfyUI chooses vectors from.

    ``named`` holds a dict file's tensors in file order; ``pieces`` the tensors of
    a list-form file; ``fixed`` the one tensor every encoder takes
    (``string_to_param`` or a bare tensor).
    """

    path: Path
    named: Mapping[str, torch.Tensor]
    pieces: tuple[torch.Tensor, ...] = ()
    fixed: torch.Tensor | None = None

    def vectors(self, key: str, width: int) -> torch.Tensor:
        """The ``[n, width]`` vectors for encoder ``key`` (``clip_l``/``clip_g``); ModelFileError if none."""
        chosen = self._chosen(key, width)
        if chosen.ndim == 0 or chosen.numel() == 0:
            raise ModelFileError(f"{self.path}: the embedding holds no vectors")
        if chosen.shape[-1] != width:
            raise ModelFileError(
                f"{self.path}: the embedding's vectors are {chosen.shape[-1]} wide, "
                f"the text encoder ({key}) takes {width}"
            )
        return chosen.reshape(-1, width).float()

    def _chosen(self, key: str, width: int) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.pieces:
            fitting = [piece.reshape(-1, width) for piece in self.pieces if piece.shape[-1] == width]
            if not fitting:
                raise ModelFileError(f"{self.path}: no tensor of the embedding is {width} wide ({key})")
            return torch.cat(fitting)
        if key in self.named:
            return self.named[key]
        for suffix in (f".{STRING_TO_PARAM}.*", f".{key}"):
            bundled = [
                tensor for name, tensor in self.named.items()
                if name.startswith(BUNDLE_PREFIX) and name.endswith(suffix)
            ]
            if bundled:
                return torch.cat(bundled)
        if not self.named:
            raise ModelFileError(f"{self.path}: the embedding file holds no tensors")
        return next(iter(self.named.values()))


def read_embedding(path: Path) -> EmbeddingFile:
    """Read an embedding file (see the module docstring); ModelFileError when it cannot be used."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        with open_tensor_file(path) as source:
            return EmbeddingFile(path, {key: source.read(key) for key in source.shapes})
    if not path.is_file():
        raise ModelFileError(f"{path}: no such embedding file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds (UnpicklingError for refused globals)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{path}: not a tensors-only torch file ({reason})") from error
    return _from_loaded(path, loaded)


def _from_loaded(path: Path, loaded: Any) -> EmbeddingFile:
    if isinstance(loaded, torch.Tensor):
        return EmbeddingFile(path, {}, fixed=owned_tensor(loaded, force=True))
    if isinstance(loaded, Mapping) and STRING_TO_PARAM in loaded:
        params = loaded[STRING_TO_PARAM]
        first = next(iter(params.values()), None) if isinstance(params, Mapping) else None
        if not isinstance(first, torch.Tensor):
            raise ModelFileError(f"{path}: '{STRING_TO_PARAM}' holds no tensor")
        return EmbeddingFile(path, {}, fixed=owned_tensor(first.detach(), force=True))
    if isinstance(loaded, Sequence) and not isinstance(loaded, str):
        pieces = tuple(
            owned_tensor(value.detach(), force=True)
            for entry in loaded if isinstance(entry, Mapping)
            for value in entry.values() if isinstance(value, torch.Tensor)
        )
        if not pieces:
            raise ModelFileError(f"{path}: the embedding list holds no tensors")
        return EmbeddingFile(path, {}, pieces=pieces)
    if isinstance(loaded, Mapping):
        named = {
            str(key): owned_tensor(value.detach(), force=True)
            for key, value in loaded.items() if isinstance(value, torch.Tensor)
        }
        return EmbeddingFile(path, named)
    raise ModelFileError(f"{path}: holds a {type(loaded).__name__}, not embedding tensors")
