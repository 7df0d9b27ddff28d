"""LineArtPreprocessor (the common preprocessor pack's node and inputs) on a line-art generator file.

The image is resized so its short side is ``resolution`` (bilinear, sides rounded
to multiples of 8), run through the generator (dark lines on white, one channel),
inverted to white lines on black as line-art ControlNets expect, resized back to
the input's size and repeated to three channels. The pack picks its fine or coarse
model by ``coarse``; here ``ckpt_name`` names the file in ``models/preprocessors``
(the pack's ``sk_model.pth`` / ``sk_model2.pth``, or safetensors of the same keys; either twin
serves the other's name, ``nodes.model_files``),
and ``coarse = enable`` asks for it to be the coarse one.
"""

from __future__ import annotations

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.lineart_model import load_lineart_model
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.model_files import find_model_file
from diffsplit.engine.nodes.network_input import (
    PREPROCESSORS,
    for_network,
    network_file_input,
    resized_rgb,
    resolution_input,
)

FINE_MODEL = "sk_model.safetensors"
_MULTIPLE = 8


def lineart_map(image: torch.Tensor, network: torch.nn.Module, resolution: int) -> torch.Tensor:
    """White-on-black line art of ``image`` as an IMAGE of the same size."""
    height, width = image.shape[1:3]
    pixels = for_network(resized_rgb(image, resolution, _MULTIPLE, "bilinear"), network)
    with torch.no_grad():
        lines = network(pixels).float().cpu()
    lines = torch.nn.functional.interpolate(1.0 - lines, size=(height, width), mode="bilinear",
                                            align_corners=False).clamp(0, 1)
    return lines.repeat(1, 3, 1, 1).movedim(1, -1).contiguous()


def lineart(ctx: NodeContext, *, image: torch.Tensor, coarse: str = "disable", resolution: int = 512,
            ckpt_name: str = FINE_MODEL) -> tuple[torch.Tensor]:
    """Line art from the generator file ``ckpt_name``."""
    if coarse == "enable" and ckpt_name == FINE_MODEL:
        raise WorkflowError(f"coarse line art reads the coarse model: set ckpt_name to its file (the pack's "
                            f"sk_model2.pth) instead of {FINE_MODEL}", input_name="ckpt_name")
    network = load_lineart_model(find_model_file(ctx.model_path, PREPROCESSORS, ckpt_name))
    return (lineart_map(image, network, resolution),)


NODES: tuple[NodeClass, ...] = (
    NodeClass(
        "LineArtPreprocessor",
        (
            InputSpec("image", "IMAGE"),
            InputSpec("coarse", "COMBO", default="disable", choices=("disable", "enable")),
            resolution_input(),
            network_file_input(FINE_MODEL),
        ),
        (OutputSpec("IMAGE", "IMAGE"),),
        lineart,
        category="image/preprocessors",
        description="White-on-black line art from a line-art generator.",
    ),
)
