"""ControlNet nodes: ControlNetLoader, ControlNetApply, ControlNetApplyAdvanced (ComfyUI's declarations).

Applying a ControlNet never runs it: each conditioning entry's dict is copied
and gets ``"control": ControlHint(...)`` chained onto the hint it already had.
The sampler runs the ControlNet (see :mod:`diffsplit.engine.sampling.control`).
ControlNetApply also marks entries ``control_apply_to_uncond`` so that, like in
ComfyUI, the negative prompt is steered by the same hint; ControlNetApplyAdvanced
attaches one shared hint to positive and negative and has a percent range.
"""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.models.checkpoint import kept_file_dtype, load_controlnet
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec, master_dtype
from diffsplit.engine.types import ControlHint, ControlNet, Vae

Conditioning = list[list[Any]]


def _label(ctx: NodeContext | None) -> str:
    """How the conditioning scale estimator names a hint: the node that applied it."""
    node_id = getattr(ctx, "node_id", None)
    return "" if node_id is None else f"node {node_id}"


def controlnet_loader(ctx: NodeContext, *, control_net_name: str) -> tuple[ControlNet]:
    """ComfyUI ControlNetLoader: a ControlNet file from the store's ``controlnet`` folder (kept in its own
    half dtype where a worker asks)."""
    path = ctx.model_path("controlnet", control_net_name)
    wanted = master_dtype(ctx, "controlnet")
    return (load_controlnet(path, dtype=torch.float32 if wanted is None else kept_file_dtype(path, wanted)),)


def controlnet_apply(
    ctx: NodeContext,
    *,
    conditioning: Conditioning,
    control_net: ControlNet,
    image: torch.Tensor,
    strength: float,
) -> tuple[Conditioning]:
    """ComfyUI ControlNetApply: every entry steered by ``image`` at ``strength`` for the whole run."""
    if strength == 0:
        return (conditioning,)
    applied = []
    for cond, extras in conditioning:
        previous = extras.get("control")
        hint = ControlHint(controlnet=control_net, image=image, strength=strength, previous=previous,
                           label=_label(ctx))
        applied.append([cond, {**extras, "control": hint, "control_apply_to_uncond": True}])
    return (applied,)


def controlnet_apply_advanced(
    ctx: NodeContext,
    *,
    positive: Conditioning,
    negative: Conditioning,
    control_net: ControlNet,
    image: torch.Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
    vae: Vae | None = None,
) -> tuple[Conditioning, Conditioning]:
    """ComfyUI ControlNetApplyAdvanced: positive and negative steered between two percents of the run.

    Entries that had the same previous hint share one new hint object, so the
    sampler can batch positive and negative through one ControlNet pass. ``vae``
    (optional in ComfyUI, for ControlNets that take latents) is accepted and unused.
    """
    if strength == 0:
        return (positive, negative)
    shared: dict[int, ControlHint] = {}
    outputs = []
    for conditioning in (positive, negative):
        applied = []
        for cond, extras in conditioning:
            previous = extras.get("control")
            key = id(previous)
            if key not in shared:
                shared[key] = ControlHint(
                    controlnet=control_net,
                    image=image,
                    strength=strength,
                    start_percent=start_percent,
                    end_percent=end_percent,
                    previous=previous,
                    label=_label(ctx),
                )
            applied.append([cond, {**extras, "control": shared[key], "control_apply_to_uncond": False}])
        outputs.append(applied)
    return (outputs[0], outputs[1])


_STRENGTH = InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01)

CONTROLNET_LOADER = NodeClass(
    name="ControlNetLoader",
    inputs=(InputSpec("control_net_name", "COMBO", model_folder="controlnet"),),
    outputs=(OutputSpec("CONTROL_NET", "CONTROL_NET"),),
    function=controlnet_loader,
    category="loaders",
    is_loader=True,
    description="Load a ControlNet model.",
)

CONTROLNET_APPLY = NodeClass(
    name="ControlNetApply",
    inputs=(
        InputSpec("conditioning", "CONDITIONING"),
        InputSpec("control_net", "CONTROL_NET"),
        InputSpec("image", "IMAGE"),
        _STRENGTH,
    ),
    outputs=(OutputSpec("CONDITIONING", "CONDITIONING"),),
    function=controlnet_apply,
    category="conditioning/controlnet",
    description="Steer a conditioning (and its negative) with a ControlNet and a hint image.",
)

CONTROLNET_APPLY_ADVANCED = NodeClass(
    name="ControlNetApplyAdvanced",
    inputs=(
        InputSpec("positive", "CONDITIONING"),
        InputSpec("negative", "CONDITIONING"),
        InputSpec("control_net", "CONTROL_NET"),
        InputSpec("image", "IMAGE"),
        _STRENGTH,
        InputSpec("start_percent", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
        InputSpec("end_percent", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001),
        InputSpec("vae", "VAE", optional=True),
    ),
    outputs=(OutputSpec("positive", "CONDITIONING"), OutputSpec("negative", "CONDITIONING")),
    function=controlnet_apply_advanced,
    category="conditioning/controlnet",
    description="Steer positive and negative conditioning with a ControlNet over part of the run.",
)

NODES: tuple[NodeClass, ...] = (CONTROLNET_LOADER, CONTROLNET_APPLY, CONTROLNET_APPLY_ADVANCED)
