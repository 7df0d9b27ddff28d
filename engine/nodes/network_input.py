"""The input a preprocessor's network sees: the image resized so its short side is ``resolution`` with
both sides whole multiples of the network's stride or patch, then normalised and moved to the
network's device and dtype. A request can name any image shape and resolution: the network input is
capped at ``MAX_NETWORK_PIXELS`` (a 4096 x 4096 image) and a larger one is refused with the sizes,
before anything is allocated."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import InputSpec

#: the store folder of preprocessors' network files
PREPROCESSORS = "preprocessors"

#: the largest network input a preprocessor builds, in pixels
MAX_NETWORK_PIXELS = 4096 * 4096
#: the largest ``resolution`` a preprocessor node takes (the pack's)
MAX_RESOLUTION = 4096
#: ImageNet's normalisation, which Depth Anything and UperNet were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolution_input() -> InputSpec:
    """The preprocessor pack's optional ``resolution`` input: the short side the network sees."""
    return InputSpec("resolution", "INT", default=512, min=64, max=MAX_RESOLUTION, step=64, optional=True)


def network_file_input(default: str | None = None) -> InputSpec:
    """``ckpt_name``: the network's file in the ``preprocessors`` folder (optional where the pack reads a
    fixed file, ``default``)."""
    return InputSpec("ckpt_name", "COMBO", default=default, model_folder=PREPROCESSORS,
                     optional=default is not None)


def _side(side: float, multiple: int) -> int:
    return max(multiple, round(side / multiple) * multiple)


def network_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The ``(height, width)`` of a ``height x width`` image with its short side at ``resolution``,
    each side rounded to a multiple of ``multiple``."""
    scale = resolution / min(height, width)
    size = _side(height * scale, multiple), _side(width * scale, multiple)
    if size[0] * size[1] > MAX_NETWORK_PIXELS:
        raise WorkflowError(f"a {height}x{width} image at resolution {resolution} makes a "
                            f"{size[0]}x{size[1]} network input, over the limit of {MAX_NETWORK_PIXELS} "
                            "pixels; lower the resolution", input_name="resolution")
    return size


def resized_rgb(image: torch.Tensor, resolution: int, multiple: int, mode: str) -> torch.Tensor:
    """``image`` (IMAGE ``[B, H, W, C]``) as RGB ``[B, 3, h, w]`` in [0, 1] at :func:`network_size`."""
    pixels = image.movedim(-1, 1).float()[:, :3]
    size = network_size(pixels.shape[-2], pixels.shape[-1], resolution, multiple)
    return torch.nn.functional.interpolate(pixels, size=size, mode=mode, align_corners=False).clamp(0, 1)


def for_network(pixels: torch.Tensor, network: torch.nn.Module, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> torch.Tensor:
    """``pixels`` normalised by ``mean`` / ``std`` (when given), on ``network``'s device and dtype."""
    if mean is not None and std is not None:
        pixels = (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    parameter = next(network.parameters())
    return pixels.to(device=parameter.device, dtype=parameter.dtype)
