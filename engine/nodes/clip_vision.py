"""CLIP vision and unCLIP nodes with ComfyUI's names, inputs and semantics.

- CLIPVisionLoader: a ``clip_vision/`` file (transformers or OpenCLIP layout) as CLIP_VISION.
- CLIPVisionEncode: an IMAGE through ComfyUI's preprocessing (``crop`` "center": shorter side to
  the model's size then center crop; "none": squashed to a square) to a CLIP_VISION_OUTPUT dict.
- unCLIPConditioning: appends ``{"clip_vision_output", "strength", "noise_augmentation"}`` to every
  entry's ``unclip_conditioning`` list (entries copied; strength 0 returns the input unchanged).
  On SDXL the sampler then uses the noise-augmented image embeds as the pooled input
  (:mod:`diffsplit.engine.sampling.unclip`), ComfyUI's "revision".
- unCLIPCheckpointLoader: an SD 1.x / SDXL checkpoint plus the CLIP vision model it embeds
  (None when it has none, as in ComfyUI). SD 2.x unCLIP checkpoints (a UNet conditioned on
  image embeddings through its class embedding) are refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import UNET_PREFIX, load_checkpoint
from diffsplit.engine.models.clip_vision import (
    CHECKPOINT_PREFIXES,
    encode_image,
    find_vision_layout,
    load_clip_vision,
    load_vision_part,
)
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.types import ClipVision, DiffusionModel, TextEncoders, Vae

Conditioning = list[list[Any]]
CROP_CHOICES = ("center", "none")
#: A UNet with a class embedding but none of SDXL's text encoders: SD 2.x unCLIP.
_LABEL_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"
_SDXL_TEXT_PREFIX = "conditioner.embedders."


def clip_vision_loader(ctx: NodeContext, *, clip_name: str) -> tuple[ClipVision]:
    """ComfyUI CLIPVisionLoader: a CLIP vision model from the store's ``clip_vision`` folder."""
    path = ctx.model_path("clip_vision", clip_name)
    try:
        return (load_clip_vision(path),)
    except ModelFileError as error:
        raise ModelFileError(f"input 'clip_name' ({clip_name!r}): {error}") from error


def clip_vision_encode(
    ctx: NodeContext, *, clip_vision: ClipVision | None, image: torch.Tensor, crop: str = "center"
) -> tuple[dict[str, torch.Tensor]]:
    """ComfyUI CLIPVisionEncode: ``image_embeds``, ``last_hidden_state``, ``penultimate_hidden_states``."""
    if not isinstance(clip_vision, ClipVision):
        what = "nothing (its checkpoint holds no CLIP vision model)" if clip_vision is None else type(
            clip_vision
        ).__name__
        raise ValueError(f"input 'clip_vision' is {what}, not a CLIP vision model")
    if crop not in CROP_CHOICES:
        raise ValueError(f"input 'crop' is {crop!r}; expected one of {', '.join(CROP_CHOICES)}")
    try:
        return (encode_image(clip_vision, image, crop=crop == "center"),)
    except ValueError as error:
        raise ValueError(f"input 'image': {error}") from error


def unclip_conditioning(
    ctx: NodeContext,
    *,
    conditioning: Conditioning,
    clip_vision_output: dict[str, torch.Tensor],
    strength: float,
    noise_augmentation: float,
) -> tuple[Conditioning]:
    """ComfyUI unCLIPConditioning: the image embeds joined to each entry's ``unclip_conditioning``."""
    if strength == 0:
        return (conditioning,)
    embeds = clip_vision_output.get("image_embeds") if isinstance(clip_vision_output, dict) else None
    if not isinstance(embeds, torch.Tensor):
        raise ValueError("input 'clip_vision_output' holds no image_embeds (connect a CLIPVisionEncode)")
    item = {
        "clip_vision_output": clip_vision_output,
        "strength": float(strength),
        "noise_augmentation": float(noise_augmentation),
    }
    applied = []
    for cond, extras in conditioning:
        items = [*extras.get("unclip_conditioning", []), item]
        applied.append([cond, {**extras, "unclip_conditioning": items}])
    return (applied,)


def _refuse_sd2_unclip(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    if _LABEL_EMBEDDING in shapes and not any(key.startswith(_SDXL_TEXT_PREFIX) for key in shapes):
        raise ModelFileError(
            f"{path}: an SD 2.x unCLIP checkpoint (its UNet takes CLIP image embeddings through "
            f"'{_LABEL_EMBEDDING}'); SD 2.x unCLIP models are not supported. For image prompts use an "
            "SDXL checkpoint with CLIPVisionLoader and unCLIPConditioning (revision)"
        )


def unclip_checkpoint_loader(
    ctx: NodeContext, *, ckpt_name: str
) -> tuple[DiffusionModel, TextEncoders, Vae, ClipVision | None]:
    """ComfyUI unCLIPCheckpointLoader: MODEL, CLIP, VAE and the CLIP vision model the checkpoint embeds."""
    path = ctx.model_path("checkpoints", ckpt_name)
    try:
        with open_tensor_file(path) as source:
            _refuse_sd2_unclip(path, dict(source.shapes))
            layout = find_vision_layout(source.shapes, CHECKPOINT_PREFIXES)
            clip_vision = None if layout is None else load_vision_part(source, layout)
        parts = load_checkpoint(path)
    except ModelFileError as error:
        raise ModelFileError(f"input 'ckpt_name' ({ckpt_name!r}): {error}") from error
    return (parts.model, parts.clip, parts.vae, clip_vision)


CLIP_VISION_LOADER = NodeClass(
    name="CLIPVisionLoader",
    inputs=(InputSpec("clip_name", "COMBO", model_folder="clip_vision"),),
    outputs=(OutputSpec("CLIP_VISION", "CLIP_VISION"),),
    function=clip_vision_loader,
    category="loaders",
    is_loader=True,
    description="Load a CLIP vision (image encoder) model.",
)

CLIP_VISION_ENCODE = NodeClass(
    name="CLIPVisionEncode",
    inputs=(
        InputSpec("clip_vision", "CLIP_VISION"),
        InputSpec("image", "IMAGE"),
        InputSpec("crop", "COMBO", default="center", choices=CROP_CHOICES),
    ),
    outputs=(OutputSpec("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT"),),
    function=clip_vision_encode,
    category="conditioning",
    description="Encode an image with a CLIP vision model.",
)

UNCLIP_CONDITIONING = NodeClass(
    name="unCLIPConditioning",
    inputs=(
        InputSpec("conditioning", "CONDITIONING"),
        InputSpec("clip_vision_output", "CLIP_VISION_OUTPUT"),
        InputSpec("strength", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
        InputSpec("noise_augmentation", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.01),
    ),
    outputs=(OutputSpec("CONDITIONING", "CONDITIONING"),),
    function=unclip_conditioning,
    category="conditioning",
    description="Condition on a CLIP vision encoding (unCLIP / SDXL revision).",
)

UNCLIP_CHECKPOINT_LOADER = NodeClass(
    name="unCLIPCheckpointLoader",
    inputs=(InputSpec("ckpt_name", "COMBO", model_folder="checkpoints"),),
    outputs=(
        OutputSpec("MODEL", "MODEL"),
        OutputSpec("CLIP", "CLIP"),
        OutputSpec("VAE", "VAE"),
        OutputSpec("CLIP_VISION", "CLIP_VISION"),
    ),
    function=unclip_checkpoint_loader,
    category="loaders",
    is_loader=True,
    description="Load a checkpoint and the CLIP vision model it embeds.",
)

NODES: tuple[NodeClass, ...] = (
    CLIP_VISION_LOADER,
    CLIP_VISION_ENCODE,
    UNCLIP_CONDITIONING,
    UNCLIP_CHECKPOINT_LOADER,
)
