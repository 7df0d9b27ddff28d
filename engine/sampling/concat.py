"""The image latent an InstructPix2Pix UNet takes beside the noisy latent (ComfyUI's ``IP2P.concat_cond``).

An edit model's UNet has twice the latent channels at its input (8 for SD 1.x
and SDXL edit models): the noisy latent, scaled as usual, and after it the
latent of the image to edit, never scaled by sigma. :func:`ip2p_concat` gives
that second half for one conditioning entry, as ComfyUI builds it:

- ``concat_latent_image`` (set by InstructPixToPixConditioning; ComfyUI's
  unscaled VAE latent) when the entry has one, else zeros;
- resized (bilinear, centre crop) when its size is not the latent's, and
  brought to the latent's batch size (ComfyUI's ``resize_to_batch_size``);
- passed as it is: SD 1.x InstructPix2Pix and diffusers-trained SDXL edit
  models take the unscaled latent.

Models whose UNet input is not twice the latent channels get None (the key is
ignored, as ComfyUI ignores it for other models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffsplit.engine.types import DiffusionModel

CONCAT_KEY = "concat_latent_image"


def takes_concat(model: DiffusionModel, latent_channels: int) -> bool:
    """Whether ``model``'s UNet takes an image latent beside a noisy latent of ``latent_channels``."""
    in_channels = getattr(model.unet.config, "in_channels", latent_channels)
    return int(in_channels) == 2 * latent_channels


def ip2p_concat(
    model: DiffusionModel, extras: Mapping[str, Any], latent_shape: Sequence[int]
) -> torch.Tensor | None:
    """The ``[B, C, H, W]`` image latent of one entry on latents of ``latent_shape``, or None."""
    batch, channels, height, width = latent_shape
    if not takes_concat(model, channels):
        return None
    image = extras.get(CONCAT_KEY)
    if image is None:
        return torch.zeros(batch, channels, height, width)
    image = image.float()
    if tuple(image.shape[1:]) != (channels, height, width):
        from diffsplit.engine.nodes.upscale import common_upscale

        image = common_upscale(image, width, height, "bilinear", "center")
    return resize_to_batch(image, batch)


def resize_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor`` with ``batch`` rows picked evenly from its own (ComfyUI's ``resize_to_batch_size``)."""
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if batch <= 1:
        return tensor[:batch]
    if batch < rows:
        scale = (rows - 1) / (batch - 1)
        picks = [min(round(i * scale), rows - 1) for i in range(batch)]
    else:
        scale = rows / batch
        picks = [min(math.floor((i + 0.5) * scale), rows - 1) for i in range(batch)]
    return tensor[picks]


def batched_concat(
    group: Sequence[Any], height: int, width: int, like: torch.Tensor
) -> torch.Tensor | None:
    """The image latents of a batch of entries (each cut to its area), or None when they have none."""
    parts = []
    for cond in group:
        concat = getattr(cond, "concat", None)
        if concat is None:
            return None
        h, w, y, x0 = cond.region(height, width)
        parts.append(concat[:, :, y : y + h, x0 : x0 + w])
    return torch.cat(parts).to(device=like.device, dtype=like.dtype)
