"""The objects that flow between ComfyUI-style nodes.

ComfyUI names the types of node inputs and outputs (MODEL, CLIP, VAE, ...).
Model-typed values are the frozen dataclasses below, wrapping diffusers and
transformers modules. Data-typed values keep ComfyUI's plain shapes so that
the transport can send them as-is:

- LATENT: ``{"samples": Tensor[B,4,h,w], "noise_mask"?: Tensor, "batch_index"?: list[int]}``
- CONDITIONING: ``[[Tensor[B,77k,C], {"pooled_output"?: Tensor, ...}], ...]``; SDXL
  entries carry ``width, height, crop_w, crop_h, target_width, target_height``
  (refiner: ``aesthetic_score``); ControlNetApply adds ``"control": ControlHint``;
  ConditioningSetArea adds ``"area": (h, w, y, x)`` in latent units and ``"strength"``.
  InstructPixToPixConditioning adds ``"concat_latent_image"``: ``Tensor[B,4,h,w]``, the VAE's
  latent *unscaled* as in ComfyUI (an 8-channel UNet takes it beside the noisy latent).
  GLIGENTextBoxApply adds ``"gligen": ("position", GligenModel, [(pooled, h, w, y, x), ...])``
  (box in latent units; the GLIGEN model is an ``nn.Module``, sent as its recipe).
- IMAGE: ``Tensor[B,H,W,C]`` float32 in [0, 1]; MASK: ``Tensor[B,H,W]`` float32 in [0, 1].
- CLIP_VISION_OUTPUT: ``{"image_embeds": Tensor[B,P], "last_hidden_state": Tensor[B,T,W],
  "penultimate_hidden_states": Tensor[B,T,W]}`` float32; unCLIPConditioning appends
  ``{"clip_vision_output", "strength", "noise_augmentation"}`` to an entry's ``"unclip_conditioning"`` list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

ModelFamily = Literal["sd15", "sdxl", "sdxl_refiner"]

#: ComfyUI type names whose values are models (sent as recipes, never as weights).
MODEL_TYPES: frozenset[str] = frozenset(
    {"MODEL", "CLIP", "VAE", "CONTROL_NET", "CLIP_VISION", "UPSCALE_MODEL", "GLIGEN"}
)
#: ComfyUI type names whose values are tensors or tensor containers.
INTERMEDIATE_TYPES: frozenset[str] = frozenset(
    {"LATENT", "CONDITIONING", "IMAGE", "MASK", "CLIP_VISION_OUTPUT", "POSE_KEYPOINT"}
)
#: ComfyUI type names of plain values carried inline.
NORMAL_TYPES: frozenset[str] = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class ModelSampling:
    """Discrete-time noise schedule of an SD-family model (eps or v prediction)."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000

    def sigmas(self) -> torch.Tensor:
        """The model's 1000 training sigmas, ascending, float32."""
        betas = torch.linspace(
            self.linear_start**0.5, self.linear_end**0.5, self.num_timesteps, dtype=torch.float64
        ) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """ComfyUI ``MODEL``: a denoising UNet with its noise schedule."""

    unet: torch.nn.Module
    family: ModelFamily
    sampling: ModelSampling = ModelSampling()
    #: a distilled GENIE head (``GenieHeadLoader``) for the ``genie_head`` sampler; part of the fingerprint
    genie_head: torch.nn.Module | None = None


@dataclass(frozen=True, eq=False)
class TextEncoders:
    """ComfyUI ``CLIP``: the text encoder(s) and tokenizer(s) of a model family.

    ``encoders``/``tokenizers`` are (CLIP-L,) for SD 1.x, (CLIP-L, OpenCLIP-bigG)
    for SDXL base and (OpenCLIP-bigG,) for the SDXL refiner. ``layer_idx`` is
    ComfyUI's ``stop_at_clip_layer`` (-1 = last layer, -2 = penultimate, ...),
    or None for the family default.
    """

    encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple[Any, ...]
    family: ModelFamily
    layer_idx: int | None = None


@dataclass(frozen=True, eq=False)
class Vae:
    """ComfyUI ``VAE``: an AutoencoderKL and its latent scaling factor."""

    model: torch.nn.Module
    scaling_factor: float


@dataclass(frozen=True, eq=False)
class ControlNet:
    """ComfyUI ``CONTROL_NET``: a diffusers ControlNetModel."""

    model: torch.nn.Module


@dataclass(frozen=True, eq=False)
class UpscaleModel:
    """ComfyUI ``UPSCALE_MODEL``: an image-to-image network and what spandrel's descriptor says of it.

    ``model`` maps ``[1, input_channels, H, W]`` in [0, 1] to ``[1, output_channels,
    scale*H, scale*W]``; inputs are padded (reflect) to at least ``min_size`` and a
    multiple of ``size_multiple`` first, and the padding is cut from the result.
    """

    model: torch.nn.Module
    architecture: str
    scale: int
    input_channels: int = 3
    output_channels: int = 3
    min_size: int = 0
    size_multiple: int = 1
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class ClipVision:
    """ComfyUI ``CLIP_VISION``: a transformers CLIPVisionModelWithProjection (image size in its config)."""

    model: torch.nn.Module


@dataclass(frozen=True, eq=False)
class ControlHint:
    """What ControlNetApply attaches to a conditioning entry under ``"control"``.

    ``image`` is an IMAGE tensor; ``previous`` chains hints applied on top of
    each other (their residuals add up); ``label`` names the node that applied it.
    """

    controlnet: ControlNet
    image: torch.Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlHint | None = None
    #: which node applied it ("node 12"), for the conditioning scale estimator's decisions
    label: str = ""


@dataclass(frozen=True)
class NoiseSource:
    """ComfyUI's NOISE (RandomNoise / DisableNoise): the seed of the start noise, or None for none."""

    seed: int | None


@dataclass(frozen=True, eq=False)
class Guider:
    """ComfyUI's GUIDER (CFGGuider / BasicGuider / DualCFGGuider): a model, its conditioning, the scales.

    BasicGuider has no negative conditioning and a scale of 1. DualCFGGuider
    sets ``middle`` (its ``cond2``): ``cfg`` scales positive against middle and
    ``cfg_middle`` middle against negative (``nested``: ComfyUI's "nested" style).
    """

    model: DiffusionModel
    positive: Any
    negative: Any
    cfg: float
    middle: Any = None
    cfg_middle: float = 1.0
    nested: bool = False
