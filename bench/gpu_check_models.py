"""Full-size, seeded, random-weight SD 1.5 and SDXL checkpoints for the GPU check.

The published configs of the real models (SD 1.5: UNet, CLIP-L, VAE; SDXL base: UNet,
CLIP-L, OpenCLIP bigG, VAE), built straight on the device in the file's dtype and
written with the project's own writer (``engine.models.checkpoint.save_checkpoint``)
in the single-file ComfyUI layout its loaders read. Weights follow the tiny set's
rule (``engine.models.tiny.reinitialize``: norms near identity, other vectors
0.02·N(0,1), matrices N(0, 1/fan_in)) but the noise is drawn on the device, since
drawing billions of values on the CPU would take longer than the check itself.

Nothing downloads: the tokenizers are the tiny set's offline CLIP BPE files
(``engine.models.tokenizers``), which are the real vocabulary.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffsplit.engine.models.checkpoint import CheckpointParts, save_checkpoint
from diffsplit.engine.models.tiny import SD15_VAE_SCALE, SDXL_VAE_SCALE
from diffsplit.engine.models.tokenizers import TokenizerKind, clip_tokenizer
from diffsplit.engine.types import DiffusionModel, ModelFamily, TextEncoders, Vae
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm)

#: diffusers configs of the published UNets (runwayml SD 1.5, stabilityai SDXL base 1.0).
UNET_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "sd15": MappingProxyType({
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 64,
        "norm_num_groups": 32,
    }),
    "sdxl": MappingProxyType({
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "in_channels": 4,
        "out_channels": 4,
        "sample_size": 128,
        "norm_num_groups": 32,
    }),
})
#: Token ids as in the published SD text encoder configs (eos 2 selects CLIP's argmax pooling).
_CLIP_COMMON: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
})
#: CLIP-L (OpenAI ViT-L/14's text tower) and OpenCLIP ViT-bigG/14's text tower.
CLIP_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "clip_l": MappingProxyType({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "hidden_act": "quick_gelu",
                                "projection_dim": 768}),
    "clip_g": MappingProxyType({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}),
})


def vae_config(family: ModelFamily) -> dict[str, Any]:
    """The published SD/SDXL VAE config (they differ only in sample size and scaling factor)."""
    return {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512 if family == "sd15" else 1024,
        "scaling_factor": SD15_VAE_SCALE if family == "sd15" else SDXL_VAE_SCALE,
    }


def clip_config(kind: str) -> CLIPTextConfig:
    """The text encoder config of ``kind`` (``clip_l`` or ``clip_g``)."""
    return CLIPTextConfig(**_CLIP_COMMON, **CLIP_CONFIGS[kind])


def text_encoder_kinds(family: ModelFamily) -> tuple[TokenizerKind, ...]:
    """The text encoders of ``family`` in the order a checkpoint's TextEncoders holds them."""
    return ("clip_l",) if family == "sd15" else ("clip_l", "clip_g")


def _generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    """An independent, reproducible stream per (seed, component), on ``device`` (as tiny._generator)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def reinitialize_on_device(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """The tiny set's weight rule (``tiny.reinitialize``) with the noise drawn on the module's device.

    Noise is drawn in float32 and rounded into the parameter's dtype, one parameter at a time.
    """
    with torch.no_grad():
        for submodule in module.modules():
            is_norm = isinstance(submodule, _NORM_TYPES)
            for name, param in submodule.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32,
                                    device=param.device)
                if is_norm and name == "weight":
                    param.copy_(noise.mul_(0.02).add_(1.0))
                elif param.ndim < 2:
                    param.copy_(noise.mul_(0.02))
                else:
                    param.copy_(noise.div_(param[0].numel() ** 0.5))
    return module.eval().requires_grad_(False)


def _built(factory: Any, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> Any:
    """``factory()`` constructed on ``device``, cast to ``dtype`` and given seeded weights.

    The cast is torch's own ``Module.to``: diffusers' override warns about modules to keep in float32
    (it names none for these configs).
    """
    with torch.device(device):
        module = factory()
    return reinitialize_on_device(torch.nn.Module.to(module, dtype=dtype), generator)


def full_checkpoint_parts(family: ModelFamily, device: torch.device, dtype: torch.dtype = torch.float16,
                          seed: int = 0) -> CheckpointParts:
    """Full-size MODEL, CLIP and VAE of ``family`` (``sd15`` or ``sdxl``) on ``device`` in ``dtype``."""
    if family not in UNET_CONFIGS:
        raise ValueError(f"no full-size config for {family!r}; expected one of {sorted(UNET_CONFIGS)}")
    config = dict(UNET_CONFIGS[family])
    unet = _built(lambda: UNet2DConditionModel(**config), device, dtype,
                  _generator(device, seed, f"{family}/unet"))
    encoders = []
    for index, kind in enumerate(text_encoder_kinds(family)):
        cls = CLIPTextModel if kind == "clip_l" else CLIPTextModelWithProjection
        encoders.append(_built(lambda cls=cls, kind=kind: cls(clip_config(kind)), device, dtype,
                               _generator(device, seed, f"{family}/text_encoder{index}")))
    vae = _built(lambda: AutoencoderKL(**vae_config(family)), device, dtype,
                 _generator(device, seed, f"{family}/vae"))
    tokenizers = tuple(clip_tokenizer(kind) for kind in text_encoder_kinds(family))
    return CheckpointParts(
        model=DiffusionModel(unet=unet, family=family),
        clip=TextEncoders(encoders=tuple(encoders), tokenizers=tokenizers, family=family),
        vae=Vae(model=vae, scaling_factor=float(vae.config.scaling_factor)),
    )


@dataclass(frozen=True)
class WrittenCheckpoint:
    """One full-size checkpoint on disk and what writing it cost."""

    family: str
    path: Path
    bytes: int
    parameters: int
    build_s: float
    write_s: float


def parameter_count(parts: CheckpointParts) -> int:
    """Parameters of the UNet, text encoders and VAE together."""
    modules = (parts.model.unet, *parts.clip.encoders, parts.vae.model)
    return sum(p.numel() for module in modules for p in module.parameters())


def write_full_checkpoint(path: Path, family: ModelFamily, device: torch.device,
                          dtype: torch.dtype = torch.float16, seed: int = 0) -> WrittenCheckpoint:
    """Build ``family`` on ``device`` and write it as one safetensors checkpoint (LDM keys) at ``path``.

    The device copies are dropped before returning, so the caller's device memory is free again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = full_checkpoint_parts(family, device, dtype, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    built = time.perf_counter()
    count = parameter_count(parts)
    save_checkpoint(path, parts)
    written = time.perf_counter()
    del parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return WrittenCheckpoint(family=family, path=path, bytes=path.stat().st_size, parameters=count,
                             build_s=built - started, write_s=written - built)
