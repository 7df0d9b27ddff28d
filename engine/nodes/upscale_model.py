"""Upscale-model nodes: UpscaleModelLoader and ImageUpscaleWithModel (ComfyUI's ``nodes_upscale_model``).

ImageUpscaleWithModel runs the model as ComfyUI does: tiles of 512 pixels
overlapping by 32 (:func:`~diffsplit.engine.nodes.tiling.tiled_scale`), each
tile run as spandrel's descriptor runs it (padded to the model's size
requirements, output clamped to [0, 1], padding cut), the result clamped to
[0, 1]. Out of device memory, the tile is halved and the image tried again,
down to 128 pixels. A fourth (alpha) channel is not given to the model: it is
resized bilinearly to the result's size and put back.
"""

from __future__ import annotations

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.upscale_models import load_upscale_model
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.tiling import tiled_scale
from diffsplit.engine.nodes.upscale import common_upscale
from diffsplit.engine.types import UpscaleModel

#: ComfyUI's tile size and overlap for upscale models, in input pixels.
UPSCALE_TILE = 512
UPSCALE_OVERLAP = 32
#: Below this tile size an out-of-memory error is raised, not retried.
MIN_UPSCALE_TILE = 128


def _padding(size: int, minimum: int, multiple: int) -> int:
    """How much to add to ``size`` to reach at least ``minimum`` and a multiple of ``multiple``."""
    wanted = max(minimum, size)
    return wanted + (-wanted) % multiple - size


def pad_for_model(image: torch.Tensor, model: UpscaleModel) -> torch.Tensor:
    """``image`` ``[B, C, H, W]`` padded right and bottom to the model's size requirements.

    Reflect padding as far as it reaches (one pixel less than the side), the
    rest replicated, as spandrel pads.
    """
    height, width = image.shape[-2:]
    multiple = max(1, model.size_multiple)
    minimum = -(-model.min_size // multiple) * multiple
    pad_h, pad_w = _padding(height, minimum, multiple), _padding(width, minimum, multiple)
    if not pad_h and not pad_w:
        return image
    reflect_h, reflect_w = min(pad_h, height - 1), min(pad_w, width - 1)
    image = torch.nn.functional.pad(image, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        image = torch.nn.functional.pad(image, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return image


def run_upscale_model(model: UpscaleModel, image: torch.Tensor) -> torch.Tensor:
    """One ``[1, C, H, W]`` image through the model: ``[1, C_out, scale*H, scale*W]`` in [0, 1].

    The input is made contiguous first: convolutions give slightly different
    results for other memory layouts (a channels-last view of an IMAGE).
    """
    height, width = image.shape[-2:]
    parameter = next(model.model.parameters())
    padded = pad_for_model(image.float(), model).to(device=parameter.device, dtype=parameter.dtype)
    padded = padded.contiguous()
    with torch.no_grad():
        result = model.model(padded).float().clamp(0.0, 1.0)
    return result[..., : height * model.scale, : width * model.scale]


def upscale_image(
    model: UpscaleModel,
    image: torch.Tensor,
    *,
    tile: int = UPSCALE_TILE,
    overlap: int = UPSCALE_OVERLAP,
    ctx: NodeContext | None = None,
) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` → IMAGE upscaled by ``model.scale``, tiled as ComfyUI tiles it."""
    alpha = None
    if image.shape[-1] == 4:
        image, alpha = image[..., :3], image[..., 3:4]
    if image.shape[-1] != model.input_channels:
        raise WorkflowError(
            f"the upscale model reads {model.input_channels}-channel images; this image has "
            f"{image.shape[-1]} channel(s)",
            input_name="image",
        )
    channels_first = image.movedim(-1, -3)
    progress = ctx.progress if ctx is not None else None
    while True:
        try:
            upscaled = tiled_scale(
                channels_first,
                lambda piece: run_upscale_model(model, piece),
                tile=(tile, tile),
                overlap=overlap,
                scale=model.scale,
                out_channels=model.output_channels,
                progress=progress,
            )
            break
        except torch.OutOfMemoryError:
            tile //= 2
            if tile < MIN_UPSCALE_TILE:
                raise
    result = upscaled.movedim(-3, -1).clamp(0.0, 1.0)
    if alpha is not None:
        height, width = result.shape[1:3]
        resized = common_upscale(alpha.movedim(-1, -3).to(result), width, height, "bilinear", "disabled")
        result = torch.cat((result, resized.movedim(-3, -1)), dim=-1)
    return result


def upscale_model_loader(ctx: NodeContext, *, model_name: str) -> tuple[UpscaleModel]:
    """ComfyUI UpscaleModelLoader: a model file from ``upscale_models``."""
    return (load_upscale_model(ctx.model_path("upscale_models", model_name)),)


def image_upscale_with_model(
    ctx: NodeContext, *, upscale_model: UpscaleModel, image: torch.Tensor
) -> tuple[torch.Tensor]:
    """ComfyUI ImageUpscaleWithModel: the image through the model in 512-pixel tiles."""
    return (upscale_image(upscale_model, image, ctx=ctx),)


UPSCALE_MODEL_LOADER = NodeClass(
    name="UpscaleModelLoader",
    inputs=(InputSpec("model_name", "COMBO", model_folder="upscale_models"),),
    outputs=(OutputSpec("UPSCALE_MODEL", "UPSCALE_MODEL"),),
    function=upscale_model_loader,
    category="loaders",
    is_loader=True,
    description="Load an upscale model (ESRGAN family) from upscale_models.",
)

IMAGE_UPSCALE_WITH_MODEL = NodeClass(
    name="ImageUpscaleWithModel",
    inputs=(InputSpec("upscale_model", "UPSCALE_MODEL"), InputSpec("image", "IMAGE")),
    outputs=(OutputSpec("IMAGE", "IMAGE"),),
    function=image_upscale_with_model,
    category="image/upscaling",
    description="Upscale an image with an upscale model, in overlapping tiles.",
)

NODES: tuple[NodeClass, ...] = (UPSCALE_MODEL_LOADER, IMAGE_UPSCALE_WITH_MODEL)
