"""The tiny set's GLIGEN text-box model, for the tiny SD 1.5 UNet, in ComfyUI's file layout.

One fuser per transformer block of the tiny SD 1.5 UNet (its block channels,
its LDM block names), a position net with the real 512-wide hidden layers and
8 Fourier frequencies; text embeddings and object tokens are as wide as the
UNet's cross-attention (as in SD 1.x, where both are CLIP-L's 768). Weights
are seeded noise like the rest of the tiny set, with the gates
(``alpha_attn``/``alpha_dense``) near 0.5 so that the boxes visibly steer
the tiny model. The same seed always writes the same bytes.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from diffsplit.engine.models.gligen import (
    GatedSelfAttention,
    GligenModel,
    PositionNet,
    save_gligen,
    transformer_blocks,
)
from diffusers import UNet2DConditionModel

TINY_GLIGEN_FILE = "tiny-sd15-gligen.safetensors"
POSITION_HIDDEN = 512
FOURIER_FREQS = 8
_GATE = 0.5
_GATE_SPREAD = 0.1
_FF_MULT = 4


def tiny_gligen(seed: int = 0) -> GligenModel:
    """The tiny GLIGEN model, shaped for the tiny SD 1.5 UNet."""
    from diffsplit.engine.models.tiny import reinitialize, tiny_unet_config

    config = tiny_unet_config("sd15")
    width = int(config["cross_attention_dim"])  # type: ignore[call-overload]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    blocks = transformer_blocks(unet)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"sd15/gligen"))
    with torch.random.fork_rng(devices=[]):
        fusers = []
        for _, block in blocks.values():
            channels = int(block.norm1.normalized_shape[0])
            fusers.append(GatedSelfAttention(channels, width, channels, _FF_MULT * channels))
        position_net = PositionNet(width, 2 * 4 * FOURIER_FREQS, POSITION_HIDDEN, width)
    model = GligenModel(position_net, fusers, tuple(blocks), source=TINY_GLIGEN_FILE)
    reinitialize(model, generator)
    with torch.no_grad():
        for fuser in model.fusers:
            for gate in (fuser.alpha_attn, fuser.alpha_dense):
                gate.copy_(_GATE + _GATE_SPREAD * torch.randn((), generator=generator))
    model.requires_grad_(False)
    return model


def write_tiny_gligen(path: Path, seed: int = 0) -> Path:
    """Write the tiny GLIGEN file at ``path`` (folders created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_gligen(path, tiny_gligen(seed))
    return path
