"""Conditioning edits the core SD workflows use, with ComfyUI's names, inputs and semantics.

ConditioningAverage, ConditioningConcat, ConditioningSetMask and
ConditioningSetTimestepRange. Like every conditioning node they never modify
their inputs: entry dicts are copied and tensors replaced. The sampler reads
the keys they set (``mask``, ``mask_strength``, ``set_area_to_bounds``,
``start_percent``, ``end_percent``; see :mod:`diffsplit.engine.sampling.conds`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec

logger = logging.getLogger(__name__)

Conditioning = list[list[Any]]
_OUT = (OutputSpec("CONDITIONING", "CONDITIONING"),)


def _first_of(ctx: NodeContext, conditioning_from: Conditioning, node: str) -> list[Any]:
    if len(conditioning_from) > 1:
        logger.warning("node %s (%s): conditioning_from has %d entries; only the first is used",
                       ctx.node_id, node, len(conditioning_from))
    return conditioning_from[0]


def conditioning_average(
    ctx: NodeContext, *, conditioning_to: Conditioning, conditioning_from: Conditioning,
    conditioning_to_strength: float,
) -> tuple[Conditioning]:
    """``to * strength + from * (1 - strength)``; ``from`` is cut or zero-padded to ``to``'s length."""
    cond_from, extras_from = _first_of(ctx, conditioning_from, "ConditioningAverage")
    pooled_from = extras_from.get("pooled_output")
    out = []
    for cond_to, extras_to in conditioning_to:
        aligned = cond_from[:, : cond_to.shape[1]]
        if aligned.shape[1] < cond_to.shape[1]:
            padding = torch.zeros((1, cond_to.shape[1] - aligned.shape[1], cond_to.shape[2]))
            aligned = torch.cat([aligned, padding.to(aligned)], dim=1)
        mixed = cond_to * conditioning_to_strength + aligned * (1.0 - conditioning_to_strength)
        extras = dict(extras_to)
        pooled_to = extras_to.get("pooled_output", pooled_from)
        if pooled_from is not None and pooled_to is not None:
            extras["pooled_output"] = pooled_to * conditioning_to_strength + pooled_from * (
                1.0 - conditioning_to_strength
            )
        elif pooled_from is not None:
            extras["pooled_output"] = pooled_from
        out.append([mixed, extras])
    return (out,)


def conditioning_concat(
    ctx: NodeContext, *, conditioning_to: Conditioning, conditioning_from: Conditioning
) -> tuple[Conditioning]:
    """Each ``to`` entry with ``from``'s first embedding appended along the token axis."""
    cond_from = _first_of(ctx, conditioning_from, "ConditioningConcat")[0]
    return ([[torch.cat((cond_to, cond_from), dim=1), dict(extras)] for cond_to, extras in conditioning_to],)


def conditioning_set_mask(
    ctx: NodeContext, *, conditioning: Conditioning, mask: torch.Tensor, strength: float, set_cond_area: str
) -> tuple[Conditioning]:
    """Every entry weighted by ``mask`` (``mask bounds``: and restricted to the mask's bounding box)."""
    if mask.dim() < 3:
        mask = mask.unsqueeze(0)
    values = {"mask": mask, "set_area_to_bounds": set_cond_area != "default", "mask_strength": strength}
    return ([[cond, {**extras, **values}] for cond, extras in conditioning],)


def conditioning_set_timestep_range(
    ctx: NodeContext, *, conditioning: Conditioning, start: float, end: float
) -> tuple[Conditioning]:
    """Every entry used only between ``start`` and ``end`` (fractions of the sampling run)."""
    window = {"start_percent": start, "end_percent": end}
    return ([[cond, {**extras, **window}] for cond, extras in conditioning],)


def _percent(name: str, default: float) -> InputSpec:
    return InputSpec(name, "FLOAT", default=default, min=0.0, max=1.0, step=0.001)


NODES: tuple[NodeClass, ...] = (
    NodeClass(
        name="ConditioningAverage",
        inputs=(InputSpec("conditioning_to", "CONDITIONING"), InputSpec("conditioning_from", "CONDITIONING"),
                InputSpec("conditioning_to_strength", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01)),
        outputs=_OUT, function=conditioning_average, category="conditioning",
    ),
    NodeClass(
        name="ConditioningConcat",
        inputs=(InputSpec("conditioning_to", "CONDITIONING"), InputSpec("conditioning_from", "CONDITIONING")),
        outputs=_OUT, function=conditioning_concat, category="conditioning",
    ),
    NodeClass(
        name="ConditioningSetMask",
        inputs=(InputSpec("conditioning", "CONDITIONING"), InputSpec("mask", "MASK"),
                InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
                InputSpec("set_cond_area", "COMBO", default="default", choices=("default", "mask bounds"))),
        outputs=_OUT, function=conditioning_set_mask, category="conditioning",
    ),
    NodeClass(
        name="ConditioningSetTimestepRange",
        inputs=(InputSpec("conditioning", "CONDITIONING"), _percent("start", 0.0), _percent("end", 1.0)),
        outputs=_OUT, function=conditioning_set_timestep_range, category="advanced/conditioning",
    ),
)
