"""Seeded textual-inversion embeddings for the tiny model set, in the real file layouts.

- ``embeddings/tiny-sd15-embedding.safetensors``: A1111 style, ``emb_params``
  ``[3, 64]`` (the tiny SD 1.5 CLIP-L width);
- ``embeddings/tiny-sdxl-embedding.safetensors``: SDXL style, ``clip_l``
  ``[2, 64]`` and ``clip_g`` ``[2, 128]`` (the tiny SDXL encoder widths).

The vectors have the scale of the tiny encoders' token embeddings
(``N(0, 1/width)``). The same seed always gives byte-identical files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsplit.engine.models.safetensors_io import save_file_sorted

SD15_EMBEDDING_FILE = "tiny-sd15-embedding.safetensors"
SDXL_EMBEDDING_FILE = "tiny-sdxl-embedding.safetensors"
#: Widths of the tiny set's text encoders (``tiny._clip_config``).
CLIP_L_WIDTH = 64
CLIP_G_WIDTH = 128
SD15_VECTORS = 3
SDXL_VECTORS = 2


@dataclass(frozen=True)
class TinyEmbeddings:
    """Paths of the embedding files written by :func:`write_tiny_embeddings`."""

    sd15: Path
    sdxl: Path


def _vectors(seed: int, name: str, count: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"embedding/{name}".encode()))
    return torch.randn((count, width), generator=generator, dtype=torch.float32) / width**0.5


def tiny_embedding_tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of both files, keyed by file name then tensor key."""
    return {
        SD15_EMBEDDING_FILE: {"emb_params": _vectors(seed, "sd15", SD15_VECTORS, CLIP_L_WIDTH)},
        SDXL_EMBEDDING_FILE: {
            "clip_l": _vectors(seed, "sdxl/clip_l", SDXL_VECTORS, CLIP_L_WIDTH),
            "clip_g": _vectors(seed, "sdxl/clip_g", SDXL_VECTORS, CLIP_G_WIDTH),
        },
    }


def write_tiny_embeddings(folder: Path, seed: int = 0) -> TinyEmbeddings:
    """Write both embedding files into ``folder`` (the store's ``embeddings/``) and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in tiny_embedding_tensors(seed).items():
        save_file_sorted(tensors, folder / name)
    return TinyEmbeddings(sd15=folder / SD15_EMBEDDING_FILE, sdxl=folder / SDXL_EMBEDDING_FILE)
