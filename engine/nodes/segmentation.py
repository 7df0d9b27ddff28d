"""Semantic segmentation preprocessors: UniFormer-SemSegPreprocessor and SemSegPreprocessor (the common
preprocessor pack's node names and inputs), on an UperNet file from the ``preprocessors`` folder
(:mod:`diffsplit.engine.models.segmentation_model`): the pack's UniFormer-UperNet checkpoint, or
UperNet on ConvNeXt as transformers builds it.

The image is resized so its short side is ``resolution`` and both sides are multiples of 32
(bilinear), normalised as in training (for the pack's checkpoint with its channels reversed, as the
pack's mmsegmentation pipeline feeds it); the label scores are resized back to the input's size
(bilinear) and each pixel takes its best label's colour: a segmentation hint for a ControlNet.
``ckpt_name`` (not a widget of the pack, which reads a fixed file) names the file and defaults to
the pack's ``upernet_global_small.pth`` (its ``.safetensors`` twin serves too)."""

from __future__ import annotations

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.segmentation_model import SegmentationModel, load_segmentation_model
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.model_files import find_model_file
from diffsplit.engine.nodes.network_input import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSORS,
    for_network,
    network_file_input,
    resized_rgb,
    resolution_input,
)

#: the pack's file (its ``.safetensors`` twin serves too)
DEFAULT_MODEL = "upernet_global_small.pth"


def segmentation_map(image: torch.Tensor, model: SegmentationModel, resolution: int) -> torch.Tensor:
    """The colour-coded labels of ``image`` as an IMAGE of the same size."""
    height, width = image.shape[1:3]
    resized = resized_rgb(image, resolution, model.stride, "bilinear")
    side_h, side_w = resized.shape[-2:]
    if model.max_pixels is not None and side_h * side_w > model.max_pixels:
        raise WorkflowError(f"resolution {resolution} makes a {side_h}x{side_w} network input; this "
                            f"segmentation model's global attention takes at most {model.max_pixels} pixels "
                            "(2048 x 2048): lower the resolution", input_name="resolution")
    if model.reversed_channels:
        resized = resized.flip(1)
    pixels = for_network(resized, model.network, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        logits = model.scores(pixels).float().cpu()
    logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                             align_corners=False)
    return model.palette[logits.argmax(dim=1)].contiguous()


def semantic_segmentation(ctx: NodeContext, *, image: torch.Tensor, resolution: int = 512,
                          ckpt_name: str = DEFAULT_MODEL) -> tuple[torch.Tensor]:
    """A segmentation hint from the UperNet file ``ckpt_name``."""
    model = load_segmentation_model(find_model_file(ctx.model_path, PREPROCESSORS, ckpt_name))
    return (segmentation_map(image, model, resolution),)


def _node(name: str) -> NodeClass:
    return NodeClass(
        name,
        (
            InputSpec("image", "IMAGE"),
            resolution_input(),
            network_file_input(DEFAULT_MODEL),
        ),
        (OutputSpec("IMAGE", "IMAGE"),),
        semantic_segmentation,
        category="image/preprocessors",
        description="Colour-coded semantic segmentation from an UperNet model.",
    )


NODES: tuple[NodeClass, ...] = (_node("UniFormer-SemSegPreprocessor"), _node("SemSegPreprocessor"))
