"""The tiny set's InstructPix2Pix-style edit checkpoint: tiny SD 1.5 with an 8-channel UNet input.

The text encoder and VAE are the tiny SD 1.5 set's own (same seed, same
weights); the UNet has the tiny SD 1.5 layout with ``in_channels=8`` (the
noisy latent and the image latent, as InstructPix2Pix has) and weights of its
own. The single file has the original LDM key names, so the checkpoint
loader infers the 8 input channels from ``input_blocks.0.0.weight``.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import torch
from diffsplit.engine.models.checkpoint import CheckpointParts, save_checkpoint
from diffsplit.engine.types import DiffusionModel
from diffusers import UNet2DConditionModel

TINY_IP2P_FILE = "tiny-sd15-ip2p.safetensors"
#: UNet input channels of an InstructPix2Pix model (4 noisy + 4 image latent channels).
IP2P_IN_CHANNELS = 8


def tiny_ip2p_parts(seed: int = 0) -> CheckpointParts:
    """The tiny SD 1.5 parts with an 8-channel-input UNet of its own seeded weights."""
    from diffsplit.engine.models.tiny import reinitialize, tiny_checkpoint_parts, tiny_unet_config

    parts = tiny_checkpoint_parts("sd15", seed)
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**{**tiny_unet_config("sd15"), "in_channels": IP2P_IN_CHANNELS})
    reinitialize(unet, torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"sd15-ip2p/unet")))
    return dataclasses.replace(parts, model=DiffusionModel(unet=unet, family="sd15"))


def write_tiny_ip2p(path: Path, seed: int = 0) -> Path:
    """Write the tiny edit checkpoint to ``path`` (its folder is created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, tiny_ip2p_parts(seed))
    return path
