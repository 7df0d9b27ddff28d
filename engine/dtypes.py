"""Which dtype each kind of model computes in: ``--dtype`` and the per-kind flags.

The automatic choice follows ComfyUI's ``model_management``: on the CPU every
kind stays float32 (as loaded, so CPU runs are what they always were); on CUDA
the UNet, ControlNets and text encoders run in float16 and the VAE in bfloat16
where the device computes it natively (float16 overflows in the SDXL VAE),
else float32; on MPS the same without bfloat16. ``--dtype X`` sets every kind
to X; ``--unet-dtype``/``--vae-dtype``/``--text-encoder-dtype`` override one
kind. Sampling arithmetic (sigmas, noise, the latent between steps) stays
float32 whatever the UNet's dtype: the denoiser casts its inputs to the UNet's
dtype and its output back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from diffsplit.engine.devices import bf16_supported
from diffsplit.engine.errors import EngineError

#: The kinds of model a dtype is chosen for. ``other``: upscale models (float32 unless --dtype says).
ModelKind = Literal["unet", "vae", "text_encoder", "controlnet", "other"]
MODEL_KINDS: tuple[ModelKind, ...] = ("unet", "vae", "text_encoder", "controlnet", "other")
#: What ``--dtype`` and the per-kind flags accept.
DTYPE_NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


class DtypeError(EngineError):
    """A dtype name that is not one of auto, fp32, fp16, bf16."""


def parse_dtype(text: str, *, what: str = "dtype") -> torch.dtype | None:
    """``fp32``/``fp16``/``bf16`` as a torch dtype, ``auto`` as None."""
    name = text.strip().lower()
    if name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise DtypeError(f"{what} {text!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp16`` for torch.float16, and so on (other dtypes by torch's name)."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DtypePolicy:
    """The dtype of each model kind on one device."""

    unet: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    controlnet: torch.dtype = torch.float32
    other: torch.dtype = torch.float32

    def of(self, kind: ModelKind) -> torch.dtype:
        """The dtype for ``kind``."""
        return getattr(self, kind)

    @property
    def all_float32(self) -> bool:
        """Whether every kind stays float32 (the CPU default: models run as loaded)."""
        return all(self.of(kind) == torch.float32 for kind in MODEL_KINDS)

    def describe(self) -> str:
        """``unet=fp16 vae=bf16 ...`` for logs and --help-like summaries."""
        return " ".join(f"{kind}={dtype_name(self.of(kind))}" for kind in MODEL_KINDS)

    @classmethod
    def auto(cls, device: torch.device) -> DtypePolicy:
        """ComfyUI's choice for ``device`` (see the module docstring)."""
        if device.type == "cpu":
            return cls()
        vae = torch.bfloat16 if bf16_supported(device) else torch.float32
        half = torch.float16
        return cls(unet=half, vae=vae, text_encoder=half, controlnet=half, other=torch.float32)

    @classmethod
    def choose(
        cls,
        device: torch.device,
        *,
        dtype: str = "auto",
        unet: str = "auto",
        vae: str = "auto",
        text_encoder: str = "auto",
    ) -> DtypePolicy:
        """The policy for the flags: ``dtype`` sets every kind, the per-kind names override it."""
        everything = parse_dtype(dtype, what="--dtype")
        policy = cls.auto(device) if everything is None else cls(*(everything,) * len(MODEL_KINDS))
        overrides = {
            "unet": parse_dtype(unet, what="--unet-dtype"),
            "vae": parse_dtype(vae, what="--vae-dtype"),
            "text_encoder": parse_dtype(text_encoder, what="--text-encoder-dtype"),
        }
        chosen = {kind: value for kind, value in overrides.items() if value is not None}
        if "unet" in chosen and everything is None:
            chosen["controlnet"] = chosen["unet"]  # a ControlNet adds into the UNet: it follows its dtype
        return replace(policy, **chosen)
