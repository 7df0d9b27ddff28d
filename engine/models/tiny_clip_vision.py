"""The tiny set's CLIP vision model: a seeded ViT in ComfyUI's ``clip_vision/`` (transformers) layout.

Real CLIP vision models see 224x224 images; so does this one, through 32x32
patches (7x7 + 1 tokens) and two narrow layers, so encoding is cheap. Its
projection width is the tiny SDXL model's pooled width, so its image embeds
can stand in for the pooled text embedding (SDXL "revision", unCLIPConditioning).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from diffsplit.engine.models.clip_vision import save_clip_vision
from diffsplit.engine.types import ClipVision
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_CLIP_VISION_FILE = "tiny-clip-vision.safetensors"
IMAGE_SIZE = 224
PATCH_SIZE = 32


def tiny_sdxl_pooled_width() -> int:
    """The pooled (OpenCLIP-G projection) width the tiny SDXL UNet takes in its added embedding."""
    from diffsplit.engine.models.infer_config import ADD_TIME_ID_COUNT
    from diffsplit.engine.models.tiny import tiny_unet_config

    config = tiny_unet_config("sdxl")
    time_ids = ADD_TIME_ID_COUNT["sdxl"] * int(config["addition_time_embed_dim"])  # type: ignore[call-overload]
    return int(config["projection_class_embeddings_input_dim"]) - time_ids  # type: ignore[call-overload]


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """ViT config of the tiny model: real image size and layout, few channels (gelu, as ViT-H/bigG)."""
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=tiny_sdxl_pooled_width(),
        hidden_act="gelu",
    )


def tiny_clip_vision(seed: int = 0) -> ClipVision:
    """The tiny CLIP vision model with seeded random weights (nothing left zero)."""
    from diffsplit.engine.models.tiny import reinitialize

    with torch.random.fork_rng(devices=[]):
        model = CLIPVisionModelWithProjection(tiny_clip_vision_config())
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"clip_vision"))
    reinitialize(model, generator)
    model.requires_grad_(False)
    return ClipVision(model=model)


def write_tiny_clip_vision(path: Path, seed: int = 0) -> Path:
    """Write the tiny CLIP vision file at ``path`` (its folder created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_clip_vision(path, tiny_clip_vision(seed))
    return path
