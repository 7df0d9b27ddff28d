"""Latent nodes: empty latents, latent upscaling, VAE decode/encode and noise masks.

LATENT is ``{"samples": Tensor[B, 4, H/8, W/8], "noise_mask"?: Tensor[B, 1, H, W]}``.
Latents are stored *scaled* (the diffusers convention: what the UNet sees):
VAEEncode multiplies the VAE's mean by ``Vae.scaling_factor`` and VAEDecode
divides by it before decoding. Produced tensors are float32 on the CPU; nodes
copy the LATENT dict and never write into their inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.upscale import (
    CROP_METHODS,
    LATENT_UPSCALE_METHODS,
    common_upscale,
    crop_to_multiple,
)
from diffsplit.engine.types import Vae

MAX_RESOLUTION = 16384
#: Pixels per latent cell of SD-family VAEs.
VAE_DOWNSCALE = 8
LATENT_CHANNELS = 4
#: LatentUpscale never goes below this many pixels on a side.
MIN_LATENT_UPSCALE_PIXELS = 64

Latent = dict[str, Any]


def _module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def vae_decode(vae: Vae, samples: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, 4, h, w]`` → IMAGE ``[B, 8h, 8w, 3]`` in [0, 1], float32 on the CPU."""
    device, dtype = _module_placement(vae.model)
    with torch.no_grad():
        decoded = vae.model.decode((samples / vae.scaling_factor).to(device=device, dtype=dtype)).sample
    pixels = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return pixels.movedim(1, -1).cpu()


def vae_encode(vae: Vae, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` (H, W multiples of 8) → scaled latents: the posterior mean times the scale."""
    device, dtype = _module_placement(vae.model)
    signed = pixels[..., :3].movedim(-1, 1) * 2.0 - 1.0
    with torch.no_grad():
        posterior = vae.model.encode(signed.to(device=device, dtype=dtype)).latent_dist
    return (posterior.mean.float() * vae.scaling_factor).cpu()


def empty_latent_image(ctx: NodeContext, *, width: int, height: int, batch_size: int) -> tuple[Latent]:
    """ComfyUI EmptyLatentImage: zeros ``[batch_size, 4, height // 8, width // 8]``."""
    shape = (batch_size, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    return ({"samples": torch.zeros(shape, dtype=torch.float32)},)


def latent_upscale(
    ctx: NodeContext, *, samples: Latent, upscale_method: str, width: int, height: int, crop: str
) -> tuple[Latent]:
    """ComfyUI LatentUpscale: resize to a pixel size (0 on one side keeps the aspect; at least 64)."""
    if width == 0 and height == 0:
        return (samples,)
    latent = samples["samples"]
    if width == 0:
        height = max(MIN_LATENT_UPSCALE_PIXELS, height)
        width = max(MIN_LATENT_UPSCALE_PIXELS, round(latent.shape[-1] * height / latent.shape[-2]))
    elif height == 0:
        width = max(MIN_LATENT_UPSCALE_PIXELS, width)
        height = max(MIN_LATENT_UPSCALE_PIXELS, round(latent.shape[-2] * width / latent.shape[-1]))
    else:
        width = max(MIN_LATENT_UPSCALE_PIXELS, width)
        height = max(MIN_LATENT_UPSCALE_PIXELS, height)
    resized = common_upscale(latent, width // VAE_DOWNSCALE, height // VAE_DOWNSCALE, upscale_method, crop)
    return ({**samples, "samples": resized},)


def latent_upscale_by(
    ctx: NodeContext, *, samples: Latent, upscale_method: str, scale_by: float
) -> tuple[Latent]:
    """ComfyUI LatentUpscaleBy: resize by a factor."""
    latent = samples["samples"]
    width = round(latent.shape[-1] * scale_by)
    height = round(latent.shape[-2] * scale_by)
    return ({**samples, "samples": common_upscale(latent, width, height, upscale_method, "disabled")},)


def vae_decode_node(ctx: NodeContext, *, samples: Latent, vae: Vae) -> tuple[torch.Tensor]:
    """ComfyUI VAEDecode."""
    return (vae_decode(vae, samples["samples"]),)


def vae_encode_node(ctx: NodeContext, *, pixels: torch.Tensor, vae: Vae) -> tuple[Latent]:
    """ComfyUI VAEEncode: pixels centre-cropped to multiples of 8, then encoded (no sampling)."""
    return ({"samples": vae_encode(vae, crop_to_multiple(pixels, VAE_DOWNSCALE))},)


def grow_mask(mask: torch.Tensor, grow_by: int) -> torch.Tensor:
    """Dilate a binary mask ``[B, 1, H, W]`` by a ``grow_by`` square (ComfyUI's box convolution)."""
    if grow_by == 0:
        return mask
    kernel = torch.ones((1, 1, grow_by, grow_by), dtype=mask.dtype)
    padding = math.ceil((grow_by - 1) / 2)
    grown = torch.nn.functional.conv2d(mask.round(), kernel, padding=padding).clamp(0, 1)
    return grown[:, :, : mask.shape[-2], : mask.shape[-1]]


def vae_encode_for_inpaint(
    ctx: NodeContext, *, pixels: torch.Tensor, vae: Vae, mask: torch.Tensor, grow_mask_by: int
) -> tuple[Latent]:
    """ComfyUI VAEEncodeForInpaint: masked pixels grayed before encoding; the grown mask as noise mask."""
    pixel_height, pixel_width = pixels.shape[1], pixels.shape[2]
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    mask = torch.nn.functional.interpolate(mask, size=(pixel_height, pixel_width), mode="bilinear")
    pixels = crop_to_multiple(pixels, VAE_DOWNSCALE)
    top = (pixel_height % VAE_DOWNSCALE) // 2
    left = (pixel_width % VAE_DOWNSCALE) // 2
    mask = mask[:, :, top : top + pixels.shape[1], left : left + pixels.shape[2]]
    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
    grayed = (pixels[..., :3] - 0.5) * keep + 0.5
    noise_mask = grow_mask(mask, grow_mask_by).round()
    return ({"samples": vae_encode(vae, grayed), "noise_mask": noise_mask},)


def set_latent_noise_mask(ctx: NodeContext, *, samples: Latent, mask: torch.Tensor) -> tuple[Latent]:
    """ComfyUI SetLatentNoiseMask: the mask, as ``[B, 1, H, W]``, limits where sampling changes the latent."""
    return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)


def _size(name: str, default: int, minimum: int) -> InputSpec:
    return InputSpec(name, "INT", default=default, min=minimum, max=MAX_RESOLUTION, step=8)


_LATENT_OUT = (OutputSpec("LATENT", "LATENT"),)
_UPSCALE_METHOD = InputSpec(
    "upscale_method", "COMBO", default="nearest-exact", choices=LATENT_UPSCALE_METHODS
)

EMPTY_LATENT_IMAGE = NodeClass(
    name="EmptyLatentImage",
    inputs=(
        _size("width", 512, 16),
        _size("height", 512, 16),
        InputSpec("batch_size", "INT", default=1, min=1, max=4096),
    ),
    outputs=_LATENT_OUT,
    function=empty_latent_image,
    category="latent",
)

LATENT_UPSCALE = NodeClass(
    name="LatentUpscale",
    inputs=(
        InputSpec("samples", "LATENT"),
        _UPSCALE_METHOD,
        _size("width", 512, 0),
        _size("height", 512, 0),
        InputSpec("crop", "COMBO", default="disabled", choices=CROP_METHODS),
    ),
    outputs=_LATENT_OUT,
    function=latent_upscale,
    category="latent",
)

LATENT_UPSCALE_BY = NodeClass(
    name="LatentUpscaleBy",
    inputs=(
        InputSpec("samples", "LATENT"),
        _UPSCALE_METHOD,
        InputSpec("scale_by", "FLOAT", default=1.5, min=0.01, max=8.0, step=0.01),
    ),
    outputs=_LATENT_OUT,
    function=latent_upscale_by,
    category="latent",
)

VAE_DECODE = NodeClass(
    name="VAEDecode",
    inputs=(InputSpec("samples", "LATENT"), InputSpec("vae", "VAE")),
    outputs=(OutputSpec("IMAGE", "IMAGE"),),
    function=vae_decode_node,
    category="latent",
)

VAE_ENCODE = NodeClass(
    name="VAEEncode",
    inputs=(InputSpec("pixels", "IMAGE"), InputSpec("vae", "VAE")),
    outputs=_LATENT_OUT,
    function=vae_encode_node,
    category="latent",
)

VAE_ENCODE_FOR_INPAINT = NodeClass(
    name="VAEEncodeForInpaint",
    inputs=(
        InputSpec("pixels", "IMAGE"),
        InputSpec("vae", "VAE"),
        InputSpec("mask", "MASK"),
        InputSpec("grow_mask_by", "INT", default=6, min=0, max=64, step=1),
    ),
    outputs=_LATENT_OUT,
    function=vae_encode_for_inpaint,
    category="latent/inpaint",
)

SET_LATENT_NOISE_MASK = NodeClass(
    name="SetLatentNoiseMask",
    inputs=(InputSpec("samples", "LATENT"), InputSpec("mask", "MASK")),
    outputs=_LATENT_OUT,
    function=set_latent_noise_mask,
    category="latent/inpaint",
)

NODES: tuple[NodeClass, ...] = (
    EMPTY_LATENT_IMAGE,
    LATENT_UPSCALE,
    LATENT_UPSCALE_BY,
    VAE_DECODE,
    VAE_ENCODE,
    VAE_ENCODE_FOR_INPAINT,
    SET_LATENT_NOISE_MASK,
)
