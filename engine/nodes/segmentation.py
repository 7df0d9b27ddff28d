"""Semantic segmentation preprocessors: UniFormer-SemSegPreprocessor and SemSegPreprocessor (the common
preprocessor pack's node names and inputs), on an UperNet file from the ``preprocessors`` folder
(:mod:`diffsplit.engine.models.segmentation_model`): the pack's UniFormer-UperNet checkpoint, or
UperNet on ConvNeXt as transformers builds it.

The image is resized so its short side is ``resolution`` and both sides are multiples of 32
(bilinear) and normalised as in training; the pack's checkpoint is fed as the pack's
mmsegmentation pipeline feeds it instead (rescaled to fit 2048 x 512 keeping its ratio, whatever
the resolution, channels reversed to BGR). The label scores are resized back to the input's size
(bilinear) and each pixel takes its best label's colour: a segmentation hint for a ControlNet.
``ckpt_name`` (not a widget of the pack, which reads a fixed file) names the file and defaults to
the pack's ``upernet_global_small.pth`` (its ``.safetensors`` twin serves too)."""

from __future__ import annotations

import torch
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
#: (long side, short side) the pack's mmsegmentation test pipeline fits an image into
PACK_SCALE = (2048, 512)


def pack_resized(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` as RGB ``[B, 3, h, w]`` rescaled to fit ``PACK_SCALE`` keeping its ratio
    (mmsegmentation's ``Resize(keep_ratio=True)``: the short side at 512 unless the long side would
    pass 2048), bilinear."""
    pixels = image.movedim(-1, 1).float()[:, :3]
    height, width = pixels.shape[-2:]
    long_limit, short_limit = PACK_SCALE
    scale = min(long_limit / max(height, width), short_limit / min(height, width))
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    resized = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    return resized.clamp(0, 1)


def best_labels(scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The best label of each pixel of ``scores`` ``[B, labels, h, w]`` bilinearly resized to
    ``height x width``, one label's map at a time (memory of a few maps of the output's size, not one
    per label)."""
    def resized(label: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(scores[:, label: label + 1], size=(height, width),
                                               mode="bilinear", align_corners=False)[:, 0]

    best = resized(0)
    labels = torch.zeros(best.shape, dtype=torch.int32)
    for label in range(1, scores.shape[1]):
        up = resized(label)
        better = up > best  # ties keep the lower label, as argmax does
        best = torch.where(better, up, best)
        labels[better] = label
    return labels.long()


def segmentation_map(image: torch.Tensor, model: SegmentationModel, resolution: int) -> torch.Tensor:
    """The colour-coded labels of ``image`` as an IMAGE of the same size."""
    height, width = image.shape[1:3]
    if model.pack_pipeline:
        resized = pack_resized(image).flip(1)  # what the pack's pipeline gives its network: BGR
    else:
        resized = resized_rgb(image, resolution, model.stride, "bilinear")
    pixels = for_network(resized, model.network, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        scores = model.scores(pixels).float().cpu()
    return model.palette[best_labels(scores, height, width)].contiguous()


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
