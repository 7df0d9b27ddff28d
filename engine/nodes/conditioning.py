"""Text conditioning nodes: CLIPTextEncode (+SDXL variants) and conditioning edits.

CONDITIONING is ``[[cond Tensor[1, 77k, C], {"pooled_output": Tensor, ...}], ...]``.
Edits never modify their input: entry dicts are copied and tensors replaced,
not written to.
"""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.prompt_embeddings import PromptEmbeddings
from diffsplit.engine.nodes.text_encoding import encode_prompt, encode_prompts
from diffsplit.engine.types import TextEncoders

#: ComfyUI's MAX_RESOLUTION.
MAX_RESOLUTION = 16384

Conditioning = list[list[Any]]


def clip_text_encode(ctx: NodeContext, *, text: str, clip: TextEncoders) -> tuple[Conditioning]:
    """ComfyUI CLIPTextEncode: one entry with the token embeddings and the pooled output."""
    encoding = encode_prompt(clip, text, PromptEmbeddings(ctx, "CLIPTextEncode"))
    return ([[encoding.hidden, {"pooled_output": encoding.pooled}]],)


def clip_text_encode_sdxl(
    ctx: NodeContext,
    *,
    clip: TextEncoders,
    width: int,
    height: int,
    crop_w: int,
    crop_h: int,
    target_width: int,
    target_height: int,
    text_g: str,
    text_l: str,
) -> tuple[Conditioning]:
    """ComfyUI CLIPTextEncodeSDXL: ``text_g`` through CLIP-G, ``text_l`` through CLIP-L, plus size info."""
    if clip.family != "sdxl":
        raise WorkflowError(
            f"CLIPTextEncodeSDXL needs an SDXL base CLIP (CLIP-L and CLIP-G), got family {clip.family!r}",
            input_name="clip",
        )
    encoding = encode_prompts(clip, {"g": text_g, "l": text_l}, PromptEmbeddings(ctx, "CLIPTextEncodeSDXL"))
    extras = {
        "pooled_output": encoding.pooled,
        "width": width,
        "height": height,
        "crop_w": crop_w,
        "crop_h": crop_h,
        "target_width": target_width,
        "target_height": target_height,
    }
    return ([[encoding.hidden, extras]],)


def clip_text_encode_sdxl_refiner(
    ctx: NodeContext, *, ascore: float, width: int, height: int, text: str, clip: TextEncoders
) -> tuple[Conditioning]:
    """ComfyUI CLIPTextEncodeSDXLRefiner: the prompt plus aesthetic score and size (crop 0)."""
    encoding = encode_prompt(clip, text, PromptEmbeddings(ctx, "CLIPTextEncodeSDXLRefiner"))
    extras = {
        "pooled_output": encoding.pooled,
        "aesthetic_score": ascore,
        "width": width,
        "height": height,
        "crop_w": 0,
        "crop_h": 0,
    }
    return ([[encoding.hidden, extras]],)


def conditioning_combine(
    ctx: NodeContext, *, conditioning_1: Conditioning, conditioning_2: Conditioning
) -> tuple[Conditioning]:
    """ComfyUI ConditioningCombine: the entries of both, in order."""
    return ([*conditioning_1, *conditioning_2],)


def conditioning_set_area(
    ctx: NodeContext,
    *,
    conditioning: Conditioning,
    width: int,
    height: int,
    x: int,
    y: int,
    strength: float,
) -> tuple[Conditioning]:
    """ComfyUI ConditioningSetArea: every entry restricted to a pixel rectangle (stored in latent units)."""
    area = (height // 8, width // 8, y // 8, x // 8)
    updated = [
        [cond, {**extras, "area": area, "strength": strength, "set_area_to_bounds": False}]
        for cond, extras in conditioning
    ]
    return (updated,)


def conditioning_zero_out(ctx: NodeContext, *, conditioning: Conditioning) -> tuple[Conditioning]:
    """ComfyUI ConditioningZeroOut: zeros in place of the embeddings and the pooled output."""
    zeroed = []
    for cond, extras in conditioning:
        new_extras = dict(extras)
        pooled = extras.get("pooled_output")
        if pooled is not None:
            new_extras["pooled_output"] = torch.zeros_like(pooled)
        zeroed.append([torch.zeros_like(cond), new_extras])
    return (zeroed,)


def _resolution(name: str, default: int) -> InputSpec:
    return InputSpec(name, "INT", default=default, min=0, max=MAX_RESOLUTION)


def _area_size(name: str) -> InputSpec:
    return InputSpec(name, "INT", default=64, min=64, max=MAX_RESOLUTION, step=8)


def _area_offset(name: str) -> InputSpec:
    return InputSpec(name, "INT", default=0, min=0, max=MAX_RESOLUTION, step=8)


_CONDITIONING_OUT = (OutputSpec("CONDITIONING", "CONDITIONING"),)

CLIP_TEXT_ENCODE = NodeClass(
    name="CLIPTextEncode",
    inputs=(
        InputSpec("text", "STRING", default="", multiline=True),
        InputSpec("clip", "CLIP"),
    ),
    outputs=_CONDITIONING_OUT,
    function=clip_text_encode,
    category="conditioning",
    description="Encode a prompt with the CLIP text encoder(s) of a model.",
)

CLIP_TEXT_ENCODE_SDXL = NodeClass(
    name="CLIPTextEncodeSDXL",
    inputs=(
        InputSpec("clip", "CLIP"),
        _resolution("width", 1024),
        _resolution("height", 1024),
        _resolution("crop_w", 0),
        _resolution("crop_h", 0),
        _resolution("target_width", 1024),
        _resolution("target_height", 1024),
        InputSpec("text_g", "STRING", default="", multiline=True),
        InputSpec("text_l", "STRING", default="", multiline=True),
    ),
    outputs=_CONDITIONING_OUT,
    function=clip_text_encode_sdxl,
    category="advanced/conditioning",
    description="Encode separate CLIP-G and CLIP-L prompts for SDXL, with size conditioning.",
)

CLIP_TEXT_ENCODE_SDXL_REFINER = NodeClass(
    name="CLIPTextEncodeSDXLRefiner",
    inputs=(
        InputSpec("ascore", "FLOAT", default=6.0, min=0.0, max=1000.0, step=0.01),
        _resolution("width", 1024),
        _resolution("height", 1024),
        InputSpec("text", "STRING", default="", multiline=True),
        InputSpec("clip", "CLIP"),
    ),
    outputs=_CONDITIONING_OUT,
    function=clip_text_encode_sdxl_refiner,
    category="advanced/conditioning",
    description="Encode a prompt for the SDXL refiner, with aesthetic score and size.",
)

CONDITIONING_COMBINE = NodeClass(
    name="ConditioningCombine",
    inputs=(InputSpec("conditioning_1", "CONDITIONING"), InputSpec("conditioning_2", "CONDITIONING")),
    outputs=_CONDITIONING_OUT,
    function=conditioning_combine,
    category="conditioning",
)

CONDITIONING_SET_AREA = NodeClass(
    name="ConditioningSetArea",
    inputs=(
        InputSpec("conditioning", "CONDITIONING"),
        _area_size("width"),
        _area_size("height"),
        _area_offset("x"),
        _area_offset("y"),
        InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01),
    ),
    outputs=_CONDITIONING_OUT,
    function=conditioning_set_area,
    category="conditioning",
)

CONDITIONING_ZERO_OUT = NodeClass(
    name="ConditioningZeroOut",
    inputs=(InputSpec("conditioning", "CONDITIONING"),),
    outputs=_CONDITIONING_OUT,
    function=conditioning_zero_out,
    category="advanced/conditioning",
)

NODES: tuple[NodeClass, ...] = (
    CLIP_TEXT_ENCODE,
    CLIP_TEXT_ENCODE_SDXL,
    CLIP_TEXT_ENCODE_SDXL_REFINER,
    CONDITIONING_COMBINE,
    CONDITIONING_SET_AREA,
    CONDITIONING_ZERO_OUT,
)
