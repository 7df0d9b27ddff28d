"""CLIP vision models (ComfyUI's CLIP_VISION): loading, saving, and encoding images as ComfyUI does.

Files are read in either layout of :mod:`ldm_clip_vision`: standalone
``clip_vision/`` files hold the transformers layout at the top level, or
OpenCLIP's under ``visual.``; checkpoints may embed one under a prefix
(:data:`CHECKPOINT_PREFIXES`). The module is built on the meta device from the
config the shapes tell and given the file's (owned) tensors.

:func:`encode_image` is ComfyUI's ``ClipVisionModel.encode_image``: the image
(alpha dropped) is resized with antialiased bicubic so that its shorter side is
the model's image size and center-cropped (``crop=False``: resized to a square),
quantised to 8 bits, normalised with CLIP's mean/std, and encoded. Its result is
the CLIP_VISION_OUTPUT dict: ``image_embeds`` (projected pooled output),
``last_hidden_state`` and ``penultimate_hidden_states`` (the second to last
layer's output), float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models import infer_config as infer
from diffsplit.engine.models.checkpoint import reading
from diffsplit.engine.models.ldm_clip_vision import (
    COMPONENT,
    CONFIG_FIELDS,
    HF_MARKER_KEY,
    OPEN_CLIP_MARKER_KEY,
    OPEN_CLIP_PATCH_KEY,
    infer_hf_config,
    infer_open_clip_config,
    open_clip_vision_key_rules,
)
from diffsplit.engine.models.ldm_keys import (
    TensorFile,
    assemble_module,
    build_on_meta,
    open_tensor_file,
    read_module_state,
    same_rules,
    to_ldm_tensors,
)
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.types import ClipVision
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Where a standalone file keeps its model: the transformers layout at the top, or an OpenCLIP ``visual``.
STANDALONE_PREFIXES = ("", "visual.")
#: Where checkpoints embed an image encoder (SD 2.x unCLIP, SVD, Zero123; transformers keys at the top).
CHECKPOINT_PREFIXES = (
    "embedder.model.visual.",
    "conditioner.embedders.0.open_clip.model.visual.",
    "cond_stage_model.model.visual.",
    "",
)
_CHECKPOINT_MARKER = "model.diffusion_model."


@dataclass(frozen=True)
class VisionLayout:
    """Where a CLIP vision model sits in a file: its key prefix and whether the keys are OpenCLIP's."""

    prefix: str
    open_clip: bool


def find_vision_layout(shapes: Mapping[str, Sequence[int]], prefixes: Sequence[str]) -> VisionLayout | None:
    """The first of ``prefixes`` under which a CLIP vision model's marker key sits, or None."""
    for prefix in prefixes:
        if prefix + OPEN_CLIP_MARKER_KEY in shapes and prefix + OPEN_CLIP_PATCH_KEY in shapes:
            return VisionLayout(prefix, open_clip=True)
        if prefix + HF_MARKER_KEY in shapes:
            return VisionLayout(prefix, open_clip=False)
    return None


def _strip(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def infer_vision_config(shapes: Mapping[str, tuple[int, ...]], layout: VisionLayout) -> dict[str, Any]:
    """The CLIPVisionConfig values the shapes under ``layout`` tell."""
    stripped = _strip(shapes, layout.prefix)
    return infer_open_clip_config(stripped) if layout.open_clip else infer_hf_config(stripped)


def load_vision_part(
    source: TensorFile, layout: VisionLayout, *, dtype: torch.dtype = torch.float32
) -> ClipVision:
    """The CLIP vision model at ``layout`` in an open tensor file; ModelFileError naming the file."""
    what = f"CLIP vision '{layout.prefix}*'" if layout.prefix else "CLIP vision"
    with reading(source.path, what):
        config = infer_vision_config(source.shapes, layout)
        config.update(infer.read_overrides(source.metadata, COMPONENT))
    try:
        module = build_on_meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**config)))
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{source.path}: cannot build a CLIP vision model: {error}") from error
    keys = module.state_dict().keys()
    rules = open_clip_vision_key_rules(keys) if layout.open_clip else same_rules(keys)
    state = read_module_state(source, rules, layout.prefix, dtype)
    return ClipVision(model=assemble_module(module, state, source.path))


def load_clip_vision(path: Path, *, dtype: torch.dtype = torch.float32) -> ClipVision:
    """Load a ``clip_vision/`` file (transformers layout, or an OpenCLIP model's ``visual.*``)."""
    path = Path(path)
    with open_tensor_file(path) as source:
        layout = find_vision_layout(source.shapes, STANDALONE_PREFIXES)
        if layout is None:
            hint = ""
            if any(key.startswith(_CHECKPOINT_MARKER) for key in source.shapes):
                hint = " (it is a diffusion checkpoint: load it with a checkpoint loader)"
            raise ModelFileError(
                f"{path}: not a CLIP vision file: neither '{HF_MARKER_KEY}' (transformers layout) "
                f"nor 'visual.{OPEN_CLIP_MARKER_KEY}' (OpenCLIP layout){hint}"
            )
        return load_vision_part(source, layout, dtype=dtype)


def vision_tensors(clip_vision: ClipVision, *, open_clip: bool = False, prefix: str = "") -> dict:
    """The model's tensors in a file layout (keys prefixed with ``prefix``), contiguous, on the CPU."""
    state = {key: tensor.detach().cpu() for key, tensor in clip_vision.model.state_dict().items()}
    rules = open_clip_vision_key_rules(state.keys()) if open_clip else same_rules(state.keys())
    return {key: tensor.contiguous() for key, tensor in to_ldm_tensors(rules, state, prefix).items()}


def vision_metadata(clip_vision: ClipVision, *, open_clip: bool = False) -> dict[str, str]:
    """``diffsplit.clip_vision`` metadata for the config values the shapes do not tell ({} if none)."""
    shapes = {key: tuple(t.shape) for key, t in vision_tensors(clip_vision, open_clip=open_clip).items()}
    inferred = infer_vision_config(shapes, VisionLayout("", open_clip))
    expected = CLIPVisionConfig(**inferred).to_dict()
    actual = clip_vision.model.config.to_dict()
    overrides = {name: actual[name] for name in CONFIG_FIELDS if actual[name] != expected[name]}
    return infer.write_overrides(COMPONENT, overrides)


def save_clip_vision(path: Path, clip_vision: ClipVision, *, open_clip: bool = False) -> None:
    """Write a ``clip_vision/`` file: transformers keys, or OpenCLIP's under ``visual.``."""
    tensors = vision_tensors(clip_vision, open_clip=open_clip, prefix="visual." if open_clip else "")
    save_file_sorted(tensors, str(path), metadata=vision_metadata(clip_vision, open_clip=open_clip))


def clip_preprocess(image: torch.Tensor, size: int = 224, *, crop: bool = True) -> torch.Tensor:
    """ComfyUI's ``clip_preprocess``: IMAGE ``[B, H, W, C]`` to normalised pixels ``[B, 3, size, size]``."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [batch, height, width, 3 or 4 channels]: {list(image.shape)}")
    image = image[..., :3]
    mean = torch.tensor(CLIP_MEAN, device=image.device, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device, dtype=image.dtype).view(3, 1, 1)
    pixels = image.movedim(-1, 1)
    height, width = pixels.shape[2], pixels.shape[3]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            target = (round(scale * height), round(scale * width))
        else:
            target = (size, size)
        pixels = torch.nn.functional.interpolate(pixels, size=target, mode="bicubic", antialias=True)
        top = (pixels.shape[2] - size) // 2
        left = (pixels.shape[3] - size) // 2
        pixels = pixels[:, :, top : top + size, left : left + size]
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    return (pixels - mean) / std


def encode_image(
    clip_vision: ClipVision, image: torch.Tensor, *, crop: bool = True
) -> dict[str, torch.Tensor]:
    """The CLIP_VISION_OUTPUT of ``image`` (see the module docstring)."""
    model = clip_vision.model
    parameter = next(model.parameters())
    pixels = clip_preprocess(image.to(parameter.device), int(model.config.image_size), crop=crop).float()
    with torch.no_grad():
        out = model(pixel_values=pixels.to(parameter.dtype), output_hidden_states=True, return_dict=True)
    return {
        "last_hidden_state": out.last_hidden_state.float().cpu().contiguous(),
        "image_embeds": out.image_embeds.float().cpu().contiguous(),
        "penultimate_hidden_states": out.hidden_states[-2].float().cpu().contiguous(),
    }
