"""Compositing and canvas nodes: LatentComposite, LatentCompositeMasked, ImageCompositeMasked,
ImageScaleToTotalPixels, ImagePadForOutpaint (ComfyUI's names, inputs and semantics).

Positions are in pixels; on latents they are divided by 8 (one latent cell).
Nothing writes into its inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.upscale import IMAGE_UPSCALE_METHODS, common_upscale
from diffsplit.engine.sampling.conds import repeat_to_batch

MAX_RESOLUTION = 16384
LATENT_CELL = 8
Latent = dict[str, Any]


def latent_composite(
    ctx: NodeContext, *, samples_to: Latent, samples_from: Latent, x: int, y: int, feather: int
) -> tuple[Latent]:
    """``samples_from`` pasted into ``samples_to`` at (x, y), inner edges feathered over ``feather`` px."""
    x, y, feather = x // LATENT_CELL, y // LATENT_CELL, feather // LATENT_CELL
    target = samples_to["samples"]
    result = target.clone()
    source = samples_from["samples"][:, :, : target.shape[2] - y, : target.shape[3] - x]
    height, width = source.shape[2], source.shape[3]
    if feather == 0:
        result[:, :, y : y + height, x : x + width] = source
    else:
        mask = torch.ones_like(source)
        for t in range(feather):
            weight = (1.0 / feather) * (t + 1)
            if y != 0:
                mask[:, :, t : t + 1, :] *= weight
            if y + height < target.shape[2]:
                mask[:, :, height - 1 - t : height - t, :] *= weight
            if x != 0:
                mask[:, :, :, t : t + 1] *= weight
            if x + width < target.shape[3]:
                mask[:, :, :, width - 1 - t : width - t] *= weight
        region = result[:, :, y : y + height, x : x + width]
        result[:, :, y : y + height, x : x + width] = source * mask + region * (torch.ones_like(mask) - mask)
    return ({**samples_to, "samples": result},)


def composite(
    destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
    multiplier: int, resize_source: bool,
) -> torch.Tensor:
    """ComfyUI's ``composite`` on ``[B, C, H, W]`` tensors: a new tensor, ``destination`` untouched."""
    destination = destination.clone()
    source = source.to(destination)
    if resize_source:
        source = F.interpolate(source, size=(destination.shape[2], destination.shape[3]), mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[3] * multiplier, min(x, destination.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(y, destination.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = mask.to(destination).reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        mask = F.interpolate(mask, size=(source.shape[2], source.shape[3]), mode="bilinear")
        mask = repeat_to_batch(mask, source.shape[0])
    visible_width = destination.shape[3] - left + min(0, x)
    visible_height = destination.shape[2] - top + min(0, y)
    mask = mask[:, :, :visible_height, :visible_width]
    source_part = mask * source[:, :, :visible_height, :visible_width]
    destination_part = (torch.ones_like(mask) - mask) * destination[:, :, top:bottom, left:right]
    destination[:, :, top:bottom, left:right] = source_part + destination_part
    return destination


def latent_composite_masked(
    ctx: NodeContext, *, destination: Latent, source: Latent, x: int, y: int, resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[Latent]:
    """``source`` over ``destination`` at (x, y) through ``mask`` (resized to the source)."""
    samples = composite(destination["samples"], source["samples"], x, y, mask, LATENT_CELL, resize_source)
    return ({**destination, "samples": samples},)


def image_composite_masked(
    ctx: NodeContext, *, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor]:
    """IMAGE ``source`` over ``destination`` at pixel (x, y) through ``mask``."""
    out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
    return (out.movedim(1, -1),)


def image_scale_to_total_pixels(
    ctx: NodeContext, *, image: torch.Tensor, upscale_method: str, megapixels: float
) -> tuple[torch.Tensor]:
    """Resize keeping the aspect ratio so the image has ``megapixels`` * 1024 * 1024 pixels."""
    samples = image.movedim(-1, 1)
    total = int(megapixels * 1024 * 1024)
    scale_by = math.sqrt(total / (samples.shape[3] * samples.shape[2]))
    width, height = round(samples.shape[3] * scale_by), round(samples.shape[2] * scale_by)
    return (common_upscale(samples, width, height, upscale_method, "disabled").movedim(1, -1),)


def image_pad_for_outpaint(
    ctx: NodeContext, *, image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image on a grey canvas grown by the margins, and the MASK to paint (1 outside, feathered in)."""
    batch, height, width, channels = image.shape
    canvas_shape = (batch, height + top + bottom, width + left + right, channels)
    canvas = torch.full(canvas_shape, 0.5, dtype=torch.float32)
    canvas[:, top : top + height, left : left + width, :] = image
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inner = torch.zeros((height, width), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        rows = torch.arange(height, dtype=torch.float64).reshape(-1, 1).expand(height, width)
        cols = torch.arange(width, dtype=torch.float64).reshape(1, -1).expand(height, width)
        full_h, full_w = torch.full_like(rows, height), torch.full_like(cols, width)
        distance = torch.minimum(
            torch.minimum(rows if top != 0 else full_h, height - rows if bottom != 0 else full_h),
            torch.minimum(cols if left != 0 else full_w, width - cols if right != 0 else full_w),
        )
        ramp = ((feathering - distance) / feathering) ** 2
        inner = torch.where(distance < feathering, ramp, torch.zeros_like(ramp)).to(torch.float32)
    mask[top : top + height, left : left + width] = inner
    return (canvas, mask)


def _position(name: str, step: int = 8) -> InputSpec:
    return InputSpec(name, "INT", default=0, min=0, max=MAX_RESOLUTION, step=step)


_LATENT_OUT = (OutputSpec("LATENT", "LATENT"),)
_IMAGE_OUT = (OutputSpec("IMAGE", "IMAGE"),)
_RESIZE = InputSpec("resize_source", "BOOLEAN", default=False)

NODES: tuple[NodeClass, ...] = (
    NodeClass(
        name="LatentComposite",
        inputs=(InputSpec("samples_to", "LATENT"), InputSpec("samples_from", "LATENT"),
                _position("x"), _position("y"), _position("feather")),
        outputs=_LATENT_OUT, function=latent_composite, category="latent",
    ),
    NodeClass(
        name="LatentCompositeMasked",
        inputs=(InputSpec("destination", "LATENT"), InputSpec("source", "LATENT"), _position("x"),
                _position("y"), _RESIZE, InputSpec("mask", "MASK", optional=True)),
        outputs=_LATENT_OUT, function=latent_composite_masked, category="latent",
    ),
    NodeClass(
        name="ImageCompositeMasked",
        inputs=(InputSpec("destination", "IMAGE"), InputSpec("source", "IMAGE"), _position("x", 1),
                _position("y", 1), _RESIZE, InputSpec("mask", "MASK", optional=True)),
        outputs=_IMAGE_OUT, function=image_composite_masked, category="image",
    ),
    NodeClass(
        name="ImageScaleToTotalPixels",
        inputs=(InputSpec("image", "IMAGE"),
                InputSpec("upscale_method", "COMBO", default="nearest-exact", choices=IMAGE_UPSCALE_METHODS),
                InputSpec("megapixels", "FLOAT", default=1.0, min=0.01, max=16.0, step=0.01)),
        outputs=_IMAGE_OUT, function=image_scale_to_total_pixels, category="image/upscaling",
    ),
    NodeClass(
        name="ImagePadForOutpaint",
        inputs=(InputSpec("image", "IMAGE"), _position("left"), _position("top"), _position("right"),
                _position("bottom"), InputSpec("feathering", "INT", default=40, min=0, max=MAX_RESOLUTION)),
        outputs=(OutputSpec("IMAGE", "IMAGE"), OutputSpec("MASK", "MASK")),
        function=image_pad_for_outpaint, category="image",
    ),
)
