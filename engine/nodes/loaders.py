"""Loader nodes: checkpoints, LoRAs, VAEs, and CLIPSetLastLayer.

File names are resolved through ``ctx.model_path`` (which keeps them inside
the store); nothing is memoized here, the executor caches node outputs.
LoRA nodes return new MODEL/CLIP objects and never modify their inputs.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
from diffsplit.engine.models.checkpoint import (
    CHECKPOINT_PARTS,
    PART_KINDS,
    CheckpointPart,
    check_checkpoint,
    checkpoint_part_fingerprint,
    kept_file_dtype,
    load_checkpoint_part,
    load_vae,
)
from diffsplit.engine.models.lora import apply_lora, load_lora
from diffsplit.engine.nodes.base import (
    InputSpec,
    NodeClass,
    NodeContext,
    OutputLoader,
    OutputSpec,
    master_dtype,
)
from diffsplit.engine.types import DiffusionModel, TextEncoders, Vae

#: Range of LoRA strengths, as in ComfyUI.
LORA_STRENGTH_LIMIT = 100.0


def checkpoint_loader_simple(ctx: NodeContext, *, ckpt_name: str) -> tuple[DiffusionModel, TextEncoders, Vae]:
    """ComfyUI CheckpointLoaderSimple: MODEL, CLIP and VAE from one single-file checkpoint.

    Each part is read on its own (as a deferred output is: ``output_loaders``), in float32 or the
    half dtype the context keeps (``kept_dtype``).
    """
    model, clip, vae = (_checkpoint_part(part, ctx, ckpt_name=ckpt_name) for part in CHECKPOINT_PARTS)
    return (model, clip, vae)


def _checkpoint_part(part: CheckpointPart, ctx: NodeContext, *, ckpt_name: str) -> Any:
    """One part; in the dtype the context asks for where the file stores it so (``kept_dtype``)."""
    return load_checkpoint_part(ctx.model_path("checkpoints", ckpt_name), part,
                                keep=master_dtype(ctx, PART_KINDS[part]))


def _checkpoint_part_fingerprint(part: CheckpointPart, ctx: NodeContext, *, ckpt_name: str) -> str:
    return checkpoint_part_fingerprint(ctx.model_path("checkpoints", ckpt_name), part)


def _check_checkpoint(ctx: NodeContext, *, ckpt_name: str) -> None:
    check_checkpoint(ctx.model_path("checkpoints", ckpt_name))


def lora_loader(
    ctx: NodeContext,
    *,
    model: DiffusionModel,
    clip: TextEncoders,
    lora_name: str,
    strength_model: float,
    strength_clip: float,
) -> tuple[DiffusionModel, TextEncoders]:
    """ComfyUI LoraLoader: the LoRA merged into new copies of MODEL and CLIP.

    With both strengths 0 the inputs come back unchanged and the file is not read.
    """
    new_model, new_clip = _with_lora(ctx, "LoraLoader", lora_name, model, clip, strength_model, strength_clip)
    return (new_model, new_clip)


def _with_lora(
    ctx: NodeContext, node: str, lora_name: str, model: DiffusionModel | None, clip: TextEncoders | None,
    strength_model: float, strength_clip: float,
) -> tuple[DiffusionModel | None, TextEncoders | None]:
    """``apply_lora`` with the node's file; with both strengths 0 the inputs as they are (no file read)."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    lora = load_lora(ctx.model_path("loras", lora_name))
    source = f"node {ctx.node_id} ({node}): LoRA {lora_name!r}"
    return apply_lora(model, clip, lora, strength_model, strength_clip, source=source)


def lora_loader_model_only(
    ctx: NodeContext, *, model: DiffusionModel, lora_name: str, strength_model: float
) -> tuple[DiffusionModel]:
    """ComfyUI LoraLoaderModelOnly: the LoRA's UNet part merged into a new MODEL."""
    new_model, _ = _with_lora(ctx, "LoraLoaderModelOnly", lora_name, model, None, strength_model, 0.0)
    return (new_model,)


def _lora_model_part(
    ctx: NodeContext, *, model: DiffusionModel, lora_name: str, strength_model: float, **_unused: Any
) -> DiffusionModel | None:
    """LoraLoader's MODEL alone (what ``lora_loader`` returns first); the CLIP is never built for it."""
    return _with_lora(ctx, "LoraLoader", lora_name, model, None, strength_model, 0.0)[0]


def _lora_clip_part(
    ctx: NodeContext, *, clip: TextEncoders, lora_name: str, strength_clip: float, **_unused: Any
) -> TextEncoders | None:
    """LoraLoader's CLIP alone (what ``lora_loader`` returns second); the MODEL is never built for it."""
    return _with_lora(ctx, "LoraLoader", lora_name, None, clip, 0.0, strength_clip)[1]


_LORA_MODEL_INPUTS = frozenset({"model", "lora_name", "strength_model"})
_LORA_CLIP_INPUTS = frozenset({"clip", "lora_name", "strength_clip"})


def _check_lora(ctx: NodeContext, *, lora_name: str, strength_model: float, strength_clip: float,
                **_unused: Any) -> None:
    if strength_model != 0 or strength_clip != 0:
        ctx.model_path("loras", lora_name)


def vae_loader(ctx: NodeContext, *, vae_name: str) -> tuple[Vae]:
    """ComfyUI VAELoader: a standalone VAE file (kept in its own half dtype where a worker asks)."""
    path = ctx.model_path("vae", vae_name)
    wanted = master_dtype(ctx, "vae")
    return (load_vae(path, dtype=torch.float32 if wanted is None else kept_file_dtype(path, wanted)),)


def clip_set_last_layer(
    ctx: NodeContext, *, clip: TextEncoders, stop_at_clip_layer: int
) -> tuple[TextEncoders]:
    """ComfyUI CLIPSetLastLayer: a new CLIP that stops at ``stop_at_clip_layer`` (-1 = last)."""
    return (dataclasses.replace(clip, layer_idx=stop_at_clip_layer),)


def _strength(name: str) -> InputSpec:
    return InputSpec(name, "FLOAT", default=1.0, min=-LORA_STRENGTH_LIMIT, max=LORA_STRENGTH_LIMIT, step=0.01)


CHECKPOINT_LOADER_SIMPLE = NodeClass(
    name="CheckpointLoaderSimple",
    inputs=(InputSpec("ckpt_name", "COMBO", model_folder="checkpoints"),),
    outputs=(OutputSpec("MODEL", "MODEL"), OutputSpec("CLIP", "CLIP"), OutputSpec("VAE", "VAE")),
    function=checkpoint_loader_simple,
    category="loaders",
    is_loader=True,
    description="Load a single-file SD 1.x / SDXL checkpoint.",
    output_loaders=tuple(
        OutputLoader(partial(_checkpoint_part, part), frozenset({"ckpt_name"}),
                     fingerprint=partial(_checkpoint_part_fingerprint, part), check=_check_checkpoint)
        for part in CHECKPOINT_PARTS
    ),
)

LORA_LOADER = NodeClass(
    name="LoraLoader",
    inputs=(
        InputSpec("model", "MODEL"),
        InputSpec("clip", "CLIP"),
        InputSpec("lora_name", "COMBO", model_folder="loras"),
        _strength("strength_model"),
        _strength("strength_clip"),
    ),
    outputs=(OutputSpec("MODEL", "MODEL"), OutputSpec("CLIP", "CLIP")),
    function=lora_loader,
    category="loaders",
    is_loader=True,
    description="Apply a LoRA to a model and its text encoders.",
    output_loaders=(
        OutputLoader(_lora_model_part, _LORA_MODEL_INPUTS, check=_check_lora),
        OutputLoader(_lora_clip_part, _LORA_CLIP_INPUTS, check=_check_lora),
    ),
)

LORA_LOADER_MODEL_ONLY = NodeClass(
    name="LoraLoaderModelOnly",
    inputs=(
        InputSpec("model", "MODEL"),
        InputSpec("lora_name", "COMBO", model_folder="loras"),
        _strength("strength_model"),
    ),
    outputs=(OutputSpec("MODEL", "MODEL"),),
    function=lora_loader_model_only,
    category="loaders",
    is_loader=True,
    description="Apply a LoRA to a model only.",
)

VAE_LOADER = NodeClass(
    name="VAELoader",
    inputs=(InputSpec("vae_name", "COMBO", model_folder="vae"),),
    outputs=(OutputSpec("VAE", "VAE"),),
    function=vae_loader,
    category="loaders",
    is_loader=True,
    description="Load a standalone VAE.",
)

CLIP_SET_LAST_LAYER = NodeClass(
    name="CLIPSetLastLayer",
    inputs=(
        InputSpec("clip", "CLIP"),
        InputSpec("stop_at_clip_layer", "INT", default=-1, min=-24, max=-1, step=1),
    ),
    outputs=(OutputSpec("CLIP", "CLIP"),),
    function=clip_set_last_layer,
    category="conditioning",
    is_loader=True,
    description="Choose which CLIP layer's output the text encoders return.",
)

NODES: tuple[NodeClass, ...] = (
    CHECKPOINT_LOADER_SIMPLE,
    LORA_LOADER,
    LORA_LOADER_MODEL_ONLY,
    VAE_LOADER,
    CLIP_SET_LAST_LAYER,
)
