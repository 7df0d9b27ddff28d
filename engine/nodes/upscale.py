"""Resizing of channels-first tensors (latents and images), ComfyUI's ``common_upscale``.

Methods: ``nearest-exact``, ``bilinear``, ``area``, ``bicubic`` (torch
interpolation), ``bislerp`` (bilinear in position, spherical between channel
vectors: keeps latent vector norms, used for latents) and ``lanczos`` (PIL,
8-bit, for images). ``crop="center"`` first cuts the input to the target
aspect ratio.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.imaging import image_to_pil, pil_to_tensor
from PIL import Image

UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "bislerp", "lanczos"]
CropMethod = Literal["disabled", "center"]

LATENT_UPSCALE_METHODS: tuple[str, ...] = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_UPSCALE_METHODS: tuple[str, ...] = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS: tuple[str, ...] = ("disabled", "center")
_TORCH_METHODS = frozenset({"nearest-exact", "bilinear", "area", "bicubic"})
# Below this distance from +-1 the cosine of two directions counts as parallel/opposite.
_SLERP_EPSILON = 1e-5


def common_upscale(
    samples: torch.Tensor, width: int, height: int, method: UpscaleMethod | str, crop: CropMethod | str
) -> torch.Tensor:
    """Resize ``samples`` ``[B, C, H, W]`` to ``[B, C, height, width]``; never modifies the input."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    elif crop != "disabled":
        raise WorkflowError(
            f"unknown crop method {crop!r}; expected one of {CROP_METHODS}", input_name="crop"
        )
    if method in _TORCH_METHODS:
        return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    known = sorted({*LATENT_UPSCALE_METHODS, *IMAGE_UPSCALE_METHODS})
    raise WorkflowError(
        f"unknown upscale method {method!r}; expected one of {known}", input_name="upscale_method"
    )


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The centered part of ``samples`` with the aspect ratio ``width / height``."""
    old_height, old_width = samples.shape[-2], samples.shape[-1]
    old_aspect = old_width / old_height
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_height - 2 * y).narrow(-1, x, old_width - 2 * x)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize by slerping channel vectors between neighbours, first along width, then height."""
    dtype = samples.dtype
    resized = _slerp_resize_last_axis(samples.float(), width)
    resized = _slerp_resize_last_axis(resized.transpose(-1, -2), height).transpose(-1, -2)
    return resized.to(dtype)


def _source_positions(
    old: int, new: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index: lower and upper source index and the fraction between them.

    Uses half-pixel centres (bilinear interpolation without corner alignment).
    """
    centres = (torch.arange(new, dtype=torch.float32, device=device) + 0.5) * (old / new) - 0.5
    centres = centres.clamp(0, old - 1)
    lower = centres.floor().long()
    upper = (lower + 1).clamp(max=old - 1)
    return lower, upper, centres - lower.float()


def _slerp_resize_last_axis(samples: torch.Tensor, size: int) -> torch.Tensor:
    lower, upper, fraction = _source_positions(samples.shape[-1], size, samples.device)
    start = samples.index_select(-1, lower).movedim(1, -1)
    end = samples.index_select(-1, upper).movedim(1, -1)
    ratio = fraction.reshape(*([1] * (start.dim() - 2)), size, 1)
    return slerp(start, end, ratio).movedim(-1, 1)


def slerp(start: torch.Tensor, end: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors along the last axis, norms interpolated linearly.

    Parallel vectors give ``start``; opposite ones fall back to linear interpolation.
    """
    start_norm = start.norm(dim=-1, keepdim=True)
    end_norm = end.norm(dim=-1, keepdim=True)
    start_unit = torch.where(start_norm == 0, 0.0, start / start_norm)
    end_unit = torch.where(end_norm == 0, 0.0, end / end_norm)
    cosine = (start_unit * end_unit).sum(-1, keepdim=True)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    direction = (torch.sin((1.0 - ratio) * angle) / sine) * start_unit + (
        torch.sin(ratio * angle) / sine
    ) * end_unit
    result = direction * (start_norm * (1.0 - ratio) + end_norm * ratio)
    linear = start * (1.0 - ratio) + end * ratio
    result = torch.where(cosine < _SLERP_EPSILON - 1, linear, result)
    return torch.where(cosine > 1 - _SLERP_EPSILON, start.expand_as(result), result)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize images ``[B, C, H, W]`` (C = 1, 3 or 4, values in [0, 1]) with PIL's Lanczos filter (8-bit)."""
    resized = []
    for item in samples:
        picture = image_to_pil(item.movedim(0, -1)).resize((width, height), resample=Image.Resampling.LANCZOS)
        tensor = pil_to_tensor(picture)
        resized.append(tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.movedim(-1, 0))
    return torch.stack(resized).to(device=samples.device, dtype=samples.dtype)


def crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` centre-cropped so that H and W are multiples of ``multiple``."""
    height = pixels.shape[1] // multiple * multiple
    width = pixels.shape[2] // multiple * multiple
    if (height, width) == tuple(pixels.shape[1:3]):
        return pixels
    top = (pixels.shape[1] % multiple) // 2
    left = (pixels.shape[2] % multiple) // 2
    return pixels[:, top : top + height, left : left + width, :]
