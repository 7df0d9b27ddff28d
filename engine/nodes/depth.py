"""Depth preprocessors: DepthAnythingPreprocessor and DepthAnythingV2Preprocessor (the common ComfyUI
preprocessor pack's node names and inputs), on a Depth Anything file from the ``preprocessors`` folder.

The image (IMAGE ``[B, H, W, C]``) is resized so its short side is ``resolution``
and both sides are multiples of the network's patch size (bicubic), normalised as
in training, and the predicted relative depth is resized back to ``H x W``
(bilinear), scaled to [0, 1] per image (near is bright) and repeated to three
channels: a depth hint for a ControlNet. The file is read through
``ctx.model_path``, so an offloaded node reads the client's file by sha256
(``engine.run_files``). Both versions share the architecture (a DINOv2 backbone
with a DPT head); a diffsplit file's config says which weights it holds, and for the pack's own
checkpoints the node says which layers feed the head (V1 the last four, V2 fixed ones). The pack's
checkpoints are fed as the pack feeds them: the short side at 518 px (multiples of 14) whatever
the resolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffsplit.engine.models.depth_model import load_depth_model
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.network_input import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSORS,
    for_network,
    network_file_input,
    resized_rgb,
    resolution_input,
)

_EPSILON = 1e-8
#: the short side the pack's Depth Anything pipeline gives its network, whatever the resolution
PACK_RESOLUTION = 518


def depth_map(
    image: torch.Tensor, network: torch.nn.Module, patch_size: int, resolution: int
) -> torch.Tensor:
    """The [0, 1] depth hint of ``image`` as an IMAGE of the same size."""
    height, width = image.shape[1:3]
    resized = resized_rgb(image, resolution, patch_size, "bicubic")
    pixels = for_network(resized, network, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        depth = network(pixel_values=pixels).predicted_depth.float().cpu()
    depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=(height, width), mode="bilinear",
                                            align_corners=False)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    high = depth.amax(dim=(1, 2, 3), keepdim=True)
    depth = (depth - low) / (high - low).clamp(min=_EPSILON)
    return depth.repeat(1, 3, 1, 1).movedim(1, -1).contiguous()


def depth_anything(ctx: NodeContext, *, image: torch.Tensor, ckpt_name: str, resolution: int = 512,
                   version: int = 1) -> tuple[torch.Tensor]:
    """A depth hint from the Depth Anything file ``ckpt_name`` (``version``: of an original
    checkpoint, which layers feed its head)."""
    model = load_depth_model(ctx.model_path(PREPROCESSORS, ckpt_name), version)
    side = PACK_RESOLUTION if model.pack_pipeline else resolution
    return (depth_map(image, model.network, model.patch_size, side),)


def depth_anything_v2(ctx: NodeContext, *, image: torch.Tensor, ckpt_name: str, resolution: int = 512
                      ) -> tuple[torch.Tensor]:
    """A depth hint from the Depth Anything V2 file ``ckpt_name``."""
    return depth_anything(ctx, image=image, ckpt_name=ckpt_name, resolution=resolution, version=2)


def _node(name: str, description: str, function: Callable[..., tuple[torch.Tensor]]) -> NodeClass:
    return NodeClass(
        name,
        (
            InputSpec("image", "IMAGE"),
            network_file_input(),
            resolution_input(),
        ),
        (OutputSpec("IMAGE", "IMAGE"),),
        function,
        category="image/preprocessors",
        description=description,
    )


NODES: tuple[NodeClass, ...] = (
    _node("DepthAnythingPreprocessor", "Depth hint from a Depth Anything model.", depth_anything),
    _node("DepthAnythingV2Preprocessor", "Depth hint from a Depth Anything V2 model.", depth_anything_v2),
)
