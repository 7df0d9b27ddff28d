"""CLIP vision files: their two key layouts and the model config their shapes tell.

ComfyUI's ``clip_vision`` files come in the transformers layout of
``CLIPVisionModelWithProjection`` (``vision_model.*``, ``visual_projection.weight``)
or in OpenCLIP's layout (``visual.*``, as an OpenCLIP model file or a checkpoint
that embeds its image encoder holds it), which maps onto the same module:

- ``class_embedding`` / ``conv1.weight`` / ``positional_embedding`` ↔
  ``vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}``
- ``ln_pre`` / ``ln_post`` ↔ ``vision_model.pre_layrnorm`` / ``vision_model.post_layernorm``
- ``transformer.resblocks.N.{ln_1, ln_2, attn.out_proj, mlp.c_fc, mlp.c_proj}`` ↔
  ``vision_model.encoder.layers.N.{layer_norm1, layer_norm2, self_attn.out_proj, mlp.fc1, mlp.fc2}``
- ``...attn.in_proj_weight/bias`` (fused ``[3W, ...]``) ↔ ``...self_attn.{q,k,v}_proj``
- ``proj`` ``[width, projection]`` ↔ ``visual_projection.weight`` ``[projection, width]`` (transposed)

What shapes cannot tell follows the published configs ComfyUI ships: ViT-L/14
(width 1024) uses quick_gelu, ViT-H/14 and ViT-bigG/14 (wider) gelu, and these
have 16 heads; narrower models get 64 channels per head (ViT-B) and quick_gelu.
A file may override any of it with ``diffsplit.clip_vision`` metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import KeyRule, Transform
from diffsplit.engine.models.ldm_text import open_clip_transformer_rules

Shapes = Mapping[str, tuple[int, ...]]

#: The component name of ``diffsplit.*`` config metadata.
COMPONENT = "clip_vision"
#: A key only the transformers layout has, and one only the OpenCLIP layout has.
HF_MARKER_KEY = "vision_model.embeddings.class_embedding"
OPEN_CLIP_MARKER_KEY = "transformer.resblocks.0.attn.in_proj_weight"
#: With the marker, tells an OpenCLIP image encoder from an OpenCLIP text encoder.
OPEN_CLIP_PATCH_KEY = "conv1.weight"
#: Widths from which the published configs have 16 heads and, above ViT-L's 1024, gelu.
WIDE_MODEL_WIDTH = 1024
WIDE_MODEL_HEADS = 16
CHANNELS_PER_HEAD = 64
#: CLIPVisionConfig fields that change weights or outputs (compared when saving).
CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
)  # fmt: skip

_LAYERS = "vision_model.encoder.layers."
#: Whole-key renames (module key → OpenCLIP key).
_OPEN_CLIP_KEYS: tuple[tuple[str, str, Transform], ...] = (
    ("vision_model.embeddings.class_embedding", "class_embedding", Transform.SAME),
    ("vision_model.embeddings.patch_embedding.weight", "conv1.weight", Transform.SAME),
    ("vision_model.embeddings.position_embedding.weight", "positional_embedding", Transform.SAME),
    ("vision_model.pre_layrnorm.weight", "ln_pre.weight", Transform.SAME),
    ("vision_model.pre_layrnorm.bias", "ln_pre.bias", Transform.SAME),
    ("vision_model.post_layernorm.weight", "ln_post.weight", Transform.SAME),
    ("vision_model.post_layernorm.bias", "ln_post.bias", Transform.SAME),
    ("visual_projection.weight", "proj", Transform.TRANSPOSE),
)
def open_clip_vision_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for a ``CLIPVisionModelWithProjection`` stored in OpenCLIP's ``visual.*`` layout."""
    return open_clip_transformer_rules(
        module_keys, layers_prefix=_LAYERS, whole_keys=_OPEN_CLIP_KEYS, what="CLIP vision"
    )


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise ModelFileError(f"missing weight {key!r}") from None


def _count_layers(shapes: Shapes, prefix: str) -> int:
    found = {key[len(prefix) :].split(".", 1)[0] for key in shapes if key.startswith(prefix)}
    return len([index for index in found if index.isdigit()])


def _config(
    *, patch: tuple[int, ...], positions: int, layers: int, inner: int, projection: int
) -> dict[str, Any]:
    if len(patch) != 4 or patch[2] != patch[3]:
        raise ModelFileError(f"the patch embedding has shape {list(patch)}, not [width, channels, p, p]")
    width, channels, patch_size = patch[0], patch[1], patch[2]
    side = math.isqrt(max(positions - 1, 0))
    if side * side != positions - 1 or side == 0:
        raise ModelFileError(f"{positions} position embeddings are not a square grid of patches plus one")
    if layers == 0:
        raise ModelFileError("no transformer layers")
    wide = width >= WIDE_MODEL_WIDTH
    return {
        "hidden_size": width,
        "intermediate_size": inner,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": WIDE_MODEL_HEADS if wide else max(1, width // CHANNELS_PER_HEAD),
        "num_channels": channels,
        "image_size": side * patch_size,
        "patch_size": patch_size,
        "hidden_act": "gelu" if width > WIDE_MODEL_WIDTH else "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def infer_hf_config(shapes: Shapes) -> dict[str, Any]:
    """CLIPVisionConfig values from transformers-layout shapes (prefix stripped)."""
    return _config(
        patch=_shape(shapes, "vision_model.embeddings.patch_embedding.weight"),
        positions=_shape(shapes, "vision_model.embeddings.position_embedding.weight")[0],
        layers=_count_layers(shapes, _LAYERS),
        inner=_shape(shapes, f"{_LAYERS}0.mlp.fc1.weight")[0],
        projection=_shape(shapes, "visual_projection.weight")[0],
    )


def infer_open_clip_config(shapes: Shapes) -> dict[str, Any]:
    """CLIPVisionConfig values from OpenCLIP ``visual.*`` shapes (prefix stripped)."""
    return _config(
        patch=_shape(shapes, "conv1.weight"),
        positions=_shape(shapes, "positional_embedding")[0],
        layers=_count_layers(shapes, "transformer.resblocks."),
        inner=_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection=_shape(shapes, "proj")[1],
    )
