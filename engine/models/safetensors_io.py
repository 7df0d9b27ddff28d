"""Writing safetensors files byte-for-byte reproducibly.

``safetensors.torch.save_file`` writes the ``__metadata__`` entries in an
arbitrary order, so two saves of the same tensors and metadata can differ in
bytes (and in sha256, which is how the store and recipes name files). This
writer re-serialises the header with sorted keys before writing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

_ALIGN = 8


def save_file_sorted(
    tensors: Mapping[str, torch.Tensor], path: Path | str, metadata: Mapping[str, str] | None = None
) -> None:
    """Like ``safetensors.torch.save_file`` but the header is canonical (sorted keys); atomic."""
    blob = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    (header_length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_length])
    data = blob[8 + header_length :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as stream:
        stream.write(struct.pack("<Q", len(text)))
        stream.write(text)
        stream.write(data)
    os.replace(partial, target)
