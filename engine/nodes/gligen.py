"""GLIGEN nodes: GLIGENLoader and GLIGENTextBoxApply (ComfyUI's declarations).

GLIGENTextBoxApply never runs the GLIGEN model: it encodes ``text`` with the
CLIP for the pooled output ComfyUI's ``return_pooled="unprojected"`` gives
(the last text encoder's final-layer-norm EOS token of the first chunk, no
``text_projection``) and appends ``(pooled, height // 8, width // 8, y // 8,
x // 8)`` to each entry's ``"gligen"`` boxes: ``("position", gligen, boxes)``,
the newest GLIGEN model for all of them. The sampler applies it
(:mod:`diffsplit.engine.sampling.gligen`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.gligen import MAX_OBJECTS, GligenModel, load_gligen
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.latent import MAX_RESOLUTION
from diffsplit.engine.nodes.text_encoding import empty_chunk, encoder_roles, tokenize_prompt
from diffsplit.engine.types import TextEncoders

Conditioning = list[list[Any]]
_TO_LATENT = 8


def gligen_loader(ctx: NodeContext, *, gligen_name: str) -> tuple[GligenModel]:
    """ComfyUI GLIGENLoader: a GLIGEN file from the store's ``gligen`` folder."""
    return (load_gligen(ctx.model_path("gligen", gligen_name)),)


def unprojected_pooled(clip: TextEncoders, text: str) -> torch.Tensor:
    """``[1, D]``: the last encoder's EOS token after the final layer norm, first chunk, no projection."""
    role = encoder_roles(clip.family)[-1]
    encoder, tokenizer = clip.encoders[-1], clip.tokenizers[-1]
    chunks = tokenize_prompt(tokenizer, text, pad_with_end=role.pad_with_end)
    batch = list(chunks)
    if any(chunk.is_weighted for chunk in chunks):  # encoded as CLIPTextEncode encodes it
        batch.append(empty_chunk(tokenizer, pad_with_end=role.pad_with_end))
    device = next(encoder.parameters()).device
    input_ids = torch.tensor([chunk.ids for chunk in batch], dtype=torch.long, device=device)
    with torch.no_grad():
        last = encoder(input_ids=input_ids).last_hidden_state
    return last[:1, chunks[0].end_index].float().cpu()


def gligen_textbox_apply(
    ctx: NodeContext,
    *,
    conditioning_to: Conditioning,
    clip: TextEncoders,
    gligen_textbox_model: GligenModel,
    text: str,
    width: int,
    height: int,
    x: int,
    y: int,
) -> tuple[Conditioning]:
    """ComfyUI GLIGENTextBoxApply: ``text`` placed in the box (pixels) on every entry."""
    pooled = unprojected_pooled(clip, text)
    wanted = gligen_textbox_model.position_net.in_dim
    if pooled.shape[-1] != wanted:
        raise WorkflowError(
            f"this CLIP's pooled output is {pooled.shape[-1]} wide; the GLIGEN model takes {wanted} "
            "(GLIGEN and CLIP of different model families?)",
            node_id=ctx.node_id, class_type=GLIGEN_TEXTBOX_APPLY.name, input_name="clip",
        )
    box = (pooled, height // _TO_LATENT, width // _TO_LATENT, y // _TO_LATENT, x // _TO_LATENT)
    applied = []
    for cond, extras in conditioning_to:
        previous = list(extras["gligen"][2]) if "gligen" in extras else []
        if len(previous) >= MAX_OBJECTS:
            raise WorkflowError(
                f"GLIGEN takes at most {MAX_OBJECTS} boxes per conditioning entry",
                node_id=ctx.node_id, class_type=GLIGEN_TEXTBOX_APPLY.name, input_name="conditioning_to",
            )
        applied.append([cond, {**extras, "gligen": ("position", gligen_textbox_model, [*previous, box])}])
    return (applied,)


def _size(name: str, default: int, minimum: int) -> InputSpec:
    return InputSpec(name, "INT", default=default, min=minimum, max=MAX_RESOLUTION, step=8)


GLIGEN_LOADER = NodeClass(
    name="GLIGENLoader",
    inputs=(InputSpec("gligen_name", "COMBO", model_folder="gligen"),),
    outputs=(OutputSpec("GLIGEN", "GLIGEN"),),
    function=gligen_loader,
    category="loaders",
    is_loader=True,
    description="Load a GLIGEN (grounded text box) model.",
)

GLIGEN_TEXTBOX_APPLY = NodeClass(
    name="GLIGENTextBoxApply",
    inputs=(
        InputSpec("conditioning_to", "CONDITIONING"),
        InputSpec("clip", "CLIP"),
        InputSpec("gligen_textbox_model", "GLIGEN"),
        InputSpec("text", "STRING", default="", multiline=True),
        _size("width", 64, 8),
        _size("height", 64, 8),
        _size("x", 0, 0),
        _size("y", 0, 0),
    ),
    outputs=(OutputSpec("CONDITIONING", "CONDITIONING"),),
    function=gligen_textbox_apply,
    category="conditioning/gligen",
    description="Place a text prompt in a box of the image (GLIGEN).",
)

NODES: tuple[NodeClass, ...] = (GLIGEN_LOADER, GLIGEN_TEXTBOX_APPLY)
