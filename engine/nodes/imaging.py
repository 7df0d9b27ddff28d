"""IMAGE/MASK tensors to and from PIL images and files, with ComfyUI's conventions.

IMAGE is ``Tensor[B, H, W, C]`` float32 in [0, 1]; MASK is ``Tensor[B, H, W]``.
Pixels become bytes by clipping and truncating ``255 * value`` (as ComfyUI
saves them) and come back as ``byte / 255``. A loaded mask is ``1 - alpha``:
opaque pixels are 0 (kept), transparent ones 1 (to be painted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffsplit.engine.errors import WorkflowError
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

MaskChannel = Literal["alpha", "red", "green", "blue"]
MASK_CHANNELS: tuple[MaskChannel, ...] = ("alpha", "red", "green", "blue")
#: Side of the all-zero mask returned for images without the requested channel.
DEFAULT_MASK_SIZE = 64
#: Multi-frame formats whose extra frames are not a batch (MPO: stereo JPEG pairs).
_SINGLE_FRAME_FORMATS = frozenset({"MPO"})


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE item ``[H, W, C]`` (C = 1, 3 or 4) as an 8-bit PIL image."""
    array = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def pil_to_tensor(picture: Image.Image) -> torch.Tensor:
    """A PIL image as ``[H, W, C]`` float32 in [0, 1] (``[H, W]`` for one-band images)."""
    return torch.from_numpy(np.array(picture).astype(np.float32) / 255.0)


def pil_to_image(picture: Image.Image) -> torch.Tensor:
    """A PIL image as a one-item RGB IMAGE ``[1, H, W, 3]``."""
    return pil_to_tensor(picture.convert("RGB")).unsqueeze(0)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as error:
        raise WorkflowError(f"cannot read image {path.name!r}: {error}", input_name="image") from error


def _scale_32_bit(frame: Image.Image) -> Image.Image:
    """32-bit integer images (16-bit PNGs) scaled down to the 8-bit range, as ComfyUI does."""
    if frame.mode == "I":
        return frame.point(lambda value: value * (1 / 255))
    return frame


def _alpha_mask(frame: Image.Image) -> torch.Tensor:
    if "A" in frame.getbands():
        return 1.0 - pil_to_tensor(frame.getchannel("A"))
    if frame.mode == "P" and "transparency" in frame.info:
        return 1.0 - pil_to_tensor(frame.convert("RGBA").getchannel("A"))
    return torch.zeros((DEFAULT_MASK_SIZE, DEFAULT_MASK_SIZE), dtype=torch.float32)


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI LoadImage: ``(IMAGE [N, H, W, 3], MASK [N, H', W'])`` from an image file.

    Every frame of the first frame's size becomes a batch item (animated
    formats); the mask is ``1 - alpha``, or zeros ``[64, 64]`` per item when
    the image has no transparency.
    """
    with _open(path) as picture:
        images: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        first_size = None
        for raw_frame in ImageSequence.Iterator(picture):
            frame = _scale_32_bit(ImageOps.exif_transpose(raw_frame))
            rgb = frame.convert("RGB")
            if first_size is None:
                first_size = rgb.size
            elif rgb.size != first_size:
                continue
            images.append(pil_to_image(rgb))
            masks.append(_alpha_mask(frame).unsqueeze(0))
        if len(images) > 1 and picture.format in _SINGLE_FRAME_FORMATS:
            images, masks = images[:1], masks[:1]
    return torch.cat(images, dim=0), torch.cat(masks, dim=0)


def load_mask_file(path: Path, channel: str) -> torch.Tensor:
    """ComfyUI LoadImageMask: MASK ``[1, H, W]`` from one channel (alpha is inverted: ``1 - a``)."""
    if channel not in MASK_CHANNELS:
        raise WorkflowError(
            f"unknown mask channel {channel!r}; expected one of {MASK_CHANNELS}", input_name="channel"
        )
    with _open(path) as picture:
        frame = ImageOps.exif_transpose(picture)
        if frame.getbands() != ("R", "G", "B", "A"):
            frame = _scale_32_bit(frame).convert("RGBA")
        band = channel[0].upper()
        mask = pil_to_tensor(frame.getchannel(band))
    if band == "A":
        mask = 1.0 - mask
    return mask.unsqueeze(0)


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Every item of an IMAGE batch as a PIL image."""
    return [image_to_pil(image) for image in images]
