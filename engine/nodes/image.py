"""Image nodes: loading, scaling, inverting, saving and previewing IMAGE tensors.

``LoadImage``/``LoadImageMask`` take a file name from the inputs folder. Their
choices depend on what is there, so the ``image`` input is declared as a
``COMBO`` without ``choices`` and without ``model_folder``; whether the file
exists is checked when the node runs, by ``ctx.input_path``. (In the editor's UI format these
nodes carry one extra widget value, the "upload" button, after ``image``.)
"""

from __future__ import annotations

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.imaging import MASK_CHANNELS, images_to_pil, load_image_file, load_mask_file
from diffsplit.engine.nodes.upscale import CROP_METHODS, IMAGE_UPSCALE_METHODS, common_upscale

MAX_RESOLUTION = 16384
#: Prefix of PreviewImage files (ComfyUI adds a random suffix; ours is deterministic).
PREVIEW_PREFIX = "ComfyUI_temp"


def load_image(ctx: NodeContext, *, image: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI LoadImage: IMAGE ``[N, H, W, 3]`` and MASK ``1 - alpha`` (zeros 64x64 without alpha)."""
    return load_image_file(ctx.input_path(image))


def load_image_mask(ctx: NodeContext, *, image: str, channel: str) -> tuple[torch.Tensor]:
    """ComfyUI LoadImageMask: one channel of an image as MASK ``[1, H, W]`` (alpha inverted)."""
    return (load_mask_file(ctx.input_path(image), channel),)


def image_scale(
    ctx: NodeContext, *, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
) -> tuple[torch.Tensor]:
    """ComfyUI ImageScale: resize to ``width`` x ``height`` (0 on one side keeps the aspect ratio)."""
    if width == 0 and height == 0:
        return (image,)
    channels_first = image.movedim(-1, 1)
    if width == 0:
        width = max(1, round(channels_first.shape[3] * height / channels_first.shape[2]))
    elif height == 0:
        height = max(1, round(channels_first.shape[2] * width / channels_first.shape[3]))
    return (common_upscale(channels_first, width, height, upscale_method, crop).movedim(1, -1),)


def image_scale_by(
    ctx: NodeContext, *, image: torch.Tensor, upscale_method: str, scale_by: float
) -> tuple[torch.Tensor]:
    """ComfyUI ImageScaleBy: resize by a factor."""
    channels_first = image.movedim(-1, 1)
    width = round(channels_first.shape[3] * scale_by)
    height = round(channels_first.shape[2] * scale_by)
    return (common_upscale(channels_first, width, height, upscale_method, "disabled").movedim(1, -1),)


def image_invert(ctx: NodeContext, *, image: torch.Tensor) -> tuple[torch.Tensor]:
    """ComfyUI ImageInvert: ``1 - image``."""
    return (1.0 - image,)


def save_image(ctx: NodeContext, *, images: torch.Tensor, filename_prefix: str) -> tuple[()]:
    """ComfyUI SaveImage: every image written as a PNG by ``ctx.save_image`` (which records the paths)."""
    for picture in images_to_pil(images):
        ctx.save_image(picture, filename_prefix, temporary=False)
    return ()


def preview_image(ctx: NodeContext, *, images: torch.Tensor) -> tuple[()]:
    """ComfyUI PreviewImage: every image written as a temporary PNG."""
    for picture in images_to_pil(images):
        ctx.save_image(picture, PREVIEW_PREFIX, temporary=True)
    return ()


def _image_file_input() -> InputSpec:
    return InputSpec("image", "COMBO", choices=None, model_folder=None)


_IMAGE_OUT = (OutputSpec("IMAGE", "IMAGE"),)
_UPSCALE_METHOD = InputSpec("upscale_method", "COMBO", default="nearest-exact", choices=IMAGE_UPSCALE_METHODS)

LOAD_IMAGE = NodeClass(
    name="LoadImage",
    inputs=(_image_file_input(),),
    outputs=(OutputSpec("IMAGE", "IMAGE"), OutputSpec("MASK", "MASK")),
    function=load_image,
    category="image",
    description="Load an image from the inputs folder; the mask is 1 - alpha.",
)

LOAD_IMAGE_MASK = NodeClass(
    name="LoadImageMask",
    inputs=(
        _image_file_input(),
        InputSpec("channel", "COMBO", default="alpha", choices=MASK_CHANNELS),
    ),
    outputs=(OutputSpec("MASK", "MASK"),),
    function=load_image_mask,
    category="mask",
)

IMAGE_SCALE = NodeClass(
    name="ImageScale",
    inputs=(
        InputSpec("image", "IMAGE"),
        _UPSCALE_METHOD,
        InputSpec("width", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
        InputSpec("height", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
        InputSpec("crop", "COMBO", default="disabled", choices=CROP_METHODS),
    ),
    outputs=_IMAGE_OUT,
    function=image_scale,
    category="image/upscaling",
)

IMAGE_SCALE_BY = NodeClass(
    name="ImageScaleBy",
    inputs=(
        InputSpec("image", "IMAGE"),
        _UPSCALE_METHOD,
        InputSpec("scale_by", "FLOAT", default=1.0, min=0.01, max=8.0, step=0.01),
    ),
    outputs=_IMAGE_OUT,
    function=image_scale_by,
    category="image/upscaling",
)

IMAGE_INVERT = NodeClass(
    name="ImageInvert",
    inputs=(InputSpec("image", "IMAGE"),),
    outputs=_IMAGE_OUT,
    function=image_invert,
    category="image",
)

SAVE_IMAGE = NodeClass(
    name="SaveImage",
    inputs=(
        InputSpec("images", "IMAGE"),
        InputSpec("filename_prefix", "STRING", default="ComfyUI"),
    ),
    outputs=(),
    function=save_image,
    category="image",
    output_node=True,
    description="Save images as PNG files in the output folder, with the workflow in the PNG text chunk.",
)

PREVIEW_IMAGE = NodeClass(
    name="PreviewImage",
    inputs=(InputSpec("images", "IMAGE"),),
    outputs=(),
    function=preview_image,
    category="image",
    output_node=True,
    description="Save images as temporary PNG files.",
)

NODES: tuple[NodeClass, ...] = (
    LOAD_IMAGE,
    LOAD_IMAGE_MASK,
    IMAGE_SCALE,
    IMAGE_SCALE_BY,
    IMAGE_INVERT,
    SAVE_IMAGE,
    PREVIEW_IMAGE,
)
