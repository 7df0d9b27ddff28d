"""Image preprocessors for conditions: Canny (ComfyUI's node, on kornia's ``canny`` as ComfyUI runs it).

The edge map is kornia's hysteresis output (0 or 1 per pixel), repeated to three
channels, as an IMAGE ``[B, H, W, 3]``.
"""

from __future__ import annotations

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec


def canny(
    ctx: NodeContext, *, image: torch.Tensor, low_threshold: float, high_threshold: float
) -> tuple[torch.Tensor]:
    """Canny edges of ``image`` with hysteresis between the two thresholds (fractions of the gradient)."""
    from kornia.filters import canny as kornia_canny

    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} is above high_threshold {high_threshold}")
    _, edges = kornia_canny(image.movedim(-1, 1), low_threshold, high_threshold)
    return (edges.repeat(1, 3, 1, 1).movedim(1, -1).contiguous(),)


def _threshold(name: str, default: float) -> InputSpec:
    return InputSpec(name, "FLOAT", default=default, min=0.01, max=0.99, step=0.01)


NODES: tuple[NodeClass, ...] = (
    NodeClass(
        "Canny",
        (InputSpec("image", "IMAGE"), _threshold("low_threshold", 0.4), _threshold("high_threshold", 0.8)),
        (OutputSpec("IMAGE", "IMAGE"),),
        canny,
        category="image/preprocessors",
    ),
)
