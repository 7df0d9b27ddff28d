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
- IMAGE: ``Tensor[B,H,W,C]`` float32 in [0, 1]; MASK: ``Tensor[B,H,W]`` float32 in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

ModelFamily = Literal["sd15", "sdxl", "sdxl_refiner"]

#: ComfyUI type names whose values are models (sent as recipes, never as weights).
MODEL_TYPES: frozenset[str] = frozenset(
    {"MODEL", "CLIP", "VAE", "CONTROL_NET", "CLIP_VISION", "UPSCALE_MODEL"}
)
#: ComfyUI type names whose values are tensors or tensor containers.
INTERMEDIATE_TYPES: frozenset[str] = frozenset({"LATENT", "CONDITIONING", "IMAGE", "MASK"})
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
class ControlHint:
    """What ControlNetApply attaches to a conditioning entry under ``"control"``.

    ``image`` is an IMAGE tensor; ``previous`` chains hints applied on top of
    each other (their residuals add up).
    """

    controlnet: ControlNet
    image: torch.Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlHint | None = None


@dataclass(frozen=True)
class NoiseSource:
    """ComfyUI's NOISE (RandomNoise / DisableNoise): the seed of the start noise, or None for none."""

    seed: int | None


@dataclass(frozen=True, eq=False)
class Guider:
    """ComfyUI's GUIDER (CFGGuider / BasicGuider): a model, its conditioning and the CFG scale.

    BasicGuider has no negative conditioning and a scale of 1.
    """

    model: DiffusionModel
    positive: Any
    negative: Any
    cfg: float
