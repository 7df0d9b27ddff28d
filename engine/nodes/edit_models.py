"""Image-edit models (InstructPix2Pix, CosXL Edit): InstructPixToPixConditioning and DualCFGGuider.

InstructPixToPixConditioning (ComfyUI's ``nodes_ip2p``) crops the pixels to
multiples of 8 (centred), encodes them with the VAE and attaches the latent to
every entry of both conditionings as ``concat_latent_image`` (ComfyUI's
unscaled latent, as its VAE gives it); its LATENT output is zeros of that
latent's size, the start of the edit. An edit model's 8-channel UNet takes the
image latent beside the noisy one (:mod:`~diffsplit.engine.sampling.concat`);
other models ignore it.

DualCFGGuider (ComfyUI's ``Guider_DualCFG``) guides with two conditionings and
a negative: ``cfg_conds`` scales ``cond1`` against ``cond2``,
``cfg_cond2_negative`` scales ``cond2`` against ``negative``; ``style``
"nested" nests the two (see :mod:`~diffsplit.engine.sampling.dual_cfg`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.latent import VAE_DOWNSCALE, vae_encode
from diffsplit.engine.nodes.upscale import crop_to_multiple
from diffsplit.engine.sampling.concat import CONCAT_KEY
from diffsplit.engine.types import DiffusionModel, Guider, Vae

Conditioning = list[list[Any]]
DUAL_CFG_STYLES = ("regular", "nested")


def instruct_pix_to_pix_conditioning(
    ctx: NodeContext, *, positive: Conditioning, negative: Conditioning, vae: Vae, pixels: torch.Tensor
) -> tuple[Conditioning, Conditioning, dict[str, torch.Tensor]]:
    """Both conditionings with the image's latent attached, and an empty latent of its size."""
    scaled = vae_encode(vae, crop_to_multiple(pixels, VAE_DOWNSCALE))
    concat = scaled / vae.scaling_factor  # ComfyUI keeps VAE latents unscaled

    def attached(conditioning: Conditioning) -> Conditioning:
        return [[tensor, {**extras, CONCAT_KEY: concat}] for tensor, extras in conditioning]

    return attached(positive), attached(negative), {"samples": torch.zeros_like(concat)}


def dual_cfg_guider(
    ctx: NodeContext,
    *,
    model: DiffusionModel,
    cond1: Conditioning,
    cond2: Conditioning,
    negative: Conditioning,
    cfg_conds: float,
    cfg_cond2_negative: float,
    style: str = "regular",
) -> tuple[Guider]:
    """Dual classifier-free guidance: ``cond1`` over ``cond2`` over ``negative``."""
    middle = [[tensor, {**extras, "prompt_type": "negative"}] for tensor, extras in cond2]
    return (Guider(model, cond1, negative, float(cfg_conds), middle=middle,
                   cfg_middle=float(cfg_cond2_negative), nested=style == "nested"),)


_CONDITIONING = (OutputSpec("positive", "CONDITIONING"), OutputSpec("negative", "CONDITIONING"))
_SCALE = {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}

NODES: tuple[NodeClass, ...] = (
    NodeClass(
        "InstructPixToPixConditioning",
        (
            InputSpec("positive", "CONDITIONING"),
            InputSpec("negative", "CONDITIONING"),
            InputSpec("vae", "VAE"),
            InputSpec("pixels", "IMAGE"),
        ),
        (*_CONDITIONING, OutputSpec("latent", "LATENT")),
        instruct_pix_to_pix_conditioning,
        category="conditioning/instructpix2pix",
    ),
    NodeClass(
        "DualCFGGuider",
        (
            InputSpec("model", "MODEL"),
            InputSpec("cond1", "CONDITIONING"),
            InputSpec("cond2", "CONDITIONING"),
            InputSpec("negative", "CONDITIONING"),
            InputSpec("cfg_conds", "FLOAT", **_SCALE),
            InputSpec("cfg_cond2_negative", "FLOAT", **_SCALE),
            InputSpec("style", "COMBO", default="regular", choices=DUAL_CFG_STYLES),
        ),
        (OutputSpec("GUIDER", "GUIDER"),),
        dual_cfg_guider,
        category="sampling/custom_sampling/guiders",
    ),
)
