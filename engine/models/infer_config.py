"""Module configs inferred from LDM weight shapes, never from a hub.

Real full-size files and the tiny test set load through the same code: every
size (channels, levels, resnets per level, transformer depth, context and
embedding widths, vocab, positions...) comes from the shapes. What shapes
cannot tell follows the published family configs:

- UNet/ControlNet heads: SD 1.x 8 heads; SDXL and refiner 64 channels per head;
- SDXL ``addition_time_embed_dim`` = (adm_in_channels - pooled width) / 6 for
  the base (5 for the refiner); standalone SDXL ControlNets assume the base's
  pooled width 1280;
- CLIP: 64 channels per head, quick_gelu for CLIP-L, gelu for OpenCLIP bigG,
  layer_norm_eps 1e-5, token ids bos 0 / eos 2 / pad 1 as in the published configs;
- VAE scaling factor 0.18215 (SD 1.x) / 0.13025 (SDXL); GroupNorm 32 groups.

A file may override any of it through ``diffsplit.<component>`` safetensors
metadata (a JSON object of config values); :func:`diffusers_overrides` and
:func:`clip_overrides` compute the minimal set when saving.

All shape mappings here have their component prefix stripped already.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.types import ModelFamily

Shapes = Mapping[str, tuple[int, ...]]

SD15_UNET_HEADS = 8
SDXL_CHANNELS_PER_HEAD = 64
CLIP_CHANNELS_PER_HEAD = 64
SDXL_POOLED_DIM = 1280
ADD_TIME_ID_COUNT = MappingProxyType({"sdxl": 6, "sdxl_refiner": 5})
UNET_SAMPLE_SIZE = MappingProxyType({"sd15": 64, "sdxl": 128, "sdxl_refiner": 128})
VAE_SAMPLE_SIZE = MappingProxyType({"sd15": 512, "sdxl": 1024, "sdxl_refiner": 1024})
VAE_SCALING_FACTOR = MappingProxyType({"sd15": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025})
#: CLIPTextConfig fields that change weights or outputs (compared when saving).
CLIP_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
METADATA_PREFIX = "diffsplit."


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise ModelFileError(f"missing weight {key!r}") from None


def _child_indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``{prefix}N.*``."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _first_shape_ending(shapes: Shapes, suffix: str) -> tuple[int, ...] | None:
    return next((tuple(shape) for key, shape in shapes.items() if key.endswith(suffix)), None)


@dataclass(frozen=True)
class DownLevel:
    """One down level of an LDM UNet: its resnet blocks, width and transformer depth (0: none)."""

    blocks: tuple[int, ...]
    channels: int
    depth: int


def _down_levels(shapes: Shapes) -> list[DownLevel]:
    groups: list[list[int]] = [[]]
    for index in _child_indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{index}.0.op.weight" in shapes:
            groups.append([])
        else:
            groups[-1].append(index)
    levels = []
    for blocks in groups:
        if not blocks:
            raise ModelFileError("a UNet down level without resnets")
        depths = {len(_child_indices(shapes, f"input_blocks.{b}.1.transformer_blocks.")) for b in blocks}
        if len(depths) != 1:
            raise ModelFileError("unsupported UNet: transformer depth varies inside a level")
        channels = _shape(shapes, f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0]
        levels.append(DownLevel(tuple(blocks), channels, depths.pop()))
    return levels


def _transformer_layers(levels: list[DownLevel], mid_depth: int) -> int | list[int]:
    """diffusers ``transformer_layers_per_block`` (the mid block uses its last entry)."""
    if mid_depth == 0:
        raise ModelFileError("unsupported UNet: the middle block has no transformer")
    if {level.depth for level in levels if level.depth} == {mid_depth}:
        return mid_depth
    if levels[-1].depth not in (0, mid_depth):
        raise ModelFileError("unsupported UNet: middle block depth differs from the last level's")
    return [level.depth or 1 for level in levels[:-1]] + [mid_depth]


def _unet_heads(family: ModelFamily, channels: list[int]) -> int | list[int]:
    if family == "sd15":
        return SD15_UNET_HEADS
    return [max(1, width // SDXL_CHANNELS_PER_HEAD) for width in channels]


def _addition_embedding(shapes: Shapes, family: ModelFamily, pooled_dim: int | None) -> dict[str, Any]:
    if "label_emb.0.0.weight" not in shapes:
        if family != "sd15":
            raise ModelFileError("an SDXL UNet needs 'label_emb.0.0.weight'")
        return {}
    if family == "sd15":
        raise ModelFileError("class-conditioned SD UNets ('label_emb' with CLIP-L) are not supported")
    adm_in = _shape(shapes, "label_emb.0.0.weight")[1]
    extra = adm_in - (pooled_dim if pooled_dim is not None else SDXL_POOLED_DIM)
    count = ADD_TIME_ID_COUNT[family]
    fits = extra > 0 and extra % count == 0
    if not fits and pooled_dim is not None:
        raise ModelFileError(f"adm_in_channels {adm_in} does not fit {count} time ids of an {family} UNet")
    return {
        "addition_embed_type": "text_time",
        # None: a standalone file whose pooled width is unknown; metadata must supply it.
        "addition_time_embed_dim": extra // count if fits else None,
        "projection_class_embeddings_input_dim": adm_in,
    }


def _uniform(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def _down_path_config(shapes: Shapes, family: ModelFamily, pooled_dim: int | None) -> dict[str, Any]:
    """Config entries shared by UNet and ControlNet (input blocks, middle block, embeddings)."""
    levels = _down_levels(shapes)
    if not any(level.depth for level in levels):
        raise ModelFileError("no cross-attention layers: not an SD-family UNet")
    to_k = _first_shape_ending(shapes, "attn2.to_k.weight")
    proj_in = _first_shape_ending(shapes, ".proj_in.weight")
    if to_k is None or proj_in is None:
        raise ModelFileError("missing transformer weights (attn2.to_k / proj_in)")
    channels = [level.channels for level in levels]
    mid_depth = len(_child_indices(shapes, "middle_block.1.transformer_blocks."))
    return {
        "in_channels": _shape(shapes, "input_blocks.0.0.weight")[1],
        "down_block_types": ["CrossAttnDownBlock2D" if lvl.depth else "DownBlock2D" for lvl in levels],
        "block_out_channels": channels,
        "layers_per_block": _uniform([len(level.blocks) for level in levels]),
        "transformer_layers_per_block": _transformer_layers(levels, mid_depth),
        "cross_attention_dim": to_k[1],
        "use_linear_projection": len(proj_in) == 2,
        "attention_head_dim": _unet_heads(family, channels),
        **_addition_embedding(shapes, family, pooled_dim),
    }


def infer_unet_config(
    shapes: Shapes, family: ModelFamily, *, pooled_dim: int | None = None
) -> dict[str, Any]:
    """UNet2DConditionModel config from LDM UNet shapes (``model.diffusion_model.`` stripped).

    ``pooled_dim`` is the OpenCLIP text projection width (SDXL/refiner).
    """
    config = _down_path_config(shapes, family, pooled_dim)
    time_dim = _shape(shapes, "time_embed.0.weight")[0]
    if time_dim != 4 * config["block_out_channels"][0]:
        config["time_embedding_dim"] = time_dim
    up_types = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    config["up_block_types"] = [up_types[kind] for kind in reversed(config["down_block_types"])]
    config["out_channels"] = _shape(shapes, "out.2.weight")[0]
    config["sample_size"] = UNET_SAMPLE_SIZE[family]
    return config


def controlnet_family(shapes: Shapes) -> ModelFamily:
    """SDXL when the ControlNet has SDXL's added embeddings (``label_emb``), else SD 1.x."""
    return "sdxl" if "label_emb.0.0.weight" in shapes else "sd15"


def infer_controlnet_config(shapes: Shapes) -> dict[str, Any]:
    """ControlNetModel config from LDM ControlNet shapes (``control_model.`` stripped)."""
    family = controlnet_family(shapes)
    config = _down_path_config(shapes, family, None)
    if isinstance(config["layers_per_block"], list):
        raise ModelFileError("unsupported ControlNet: resnet count varies between levels")
    hint = _child_indices(shapes, "input_hint_block.")
    if len(hint) < 2 or hint[0] != 0:
        raise ModelFileError("missing ControlNet hint encoder weights ('input_hint_block.*')")
    config["conditioning_channels"] = _shape(shapes, "input_hint_block.0.weight")[1]
    config["conditioning_embedding_out_channels"] = [
        _shape(shapes, f"input_hint_block.{index}.weight")[0] for index in hint[:-1] if index % 4 == 0
    ]
    return config


def infer_vae_config(shapes: Shapes, family: ModelFamily) -> dict[str, Any]:
    """AutoencoderKL config from LDM VAE shapes (``first_stage_model.`` stripped)."""
    levels = _child_indices(shapes, "encoder.down.")
    if not levels:
        raise ModelFileError("missing VAE encoder weights ('encoder.down.*')")
    return {
        "in_channels": _shape(shapes, "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        "layers_per_block": len(_child_indices(shapes, "encoder.down.0.block.")),
        "latent_channels": _shape(shapes, "decoder.conv_in.weight")[1],
        "scaling_factor": VAE_SCALING_FACTOR[family],
        "sample_size": VAE_SAMPLE_SIZE[family],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def _clip_config(
    *, embedding: tuple[int, ...], positions: int, layers: int, inner: int, projection: int, act: str
) -> dict[str, Any]:
    vocab, hidden = embedding
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // CLIP_CHANNELS_PER_HEAD),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def infer_clip_l_config(shapes: Shapes) -> dict[str, Any]:
    """CLIPTextConfig values from HF-layout CLIP-L shapes (``text_model.*`` keys)."""
    embedding = _shape(shapes, "text_model.embeddings.token_embedding.weight")
    return _clip_config(
        embedding=embedding,
        positions=_shape(shapes, "text_model.embeddings.position_embedding.weight")[0],
        layers=len(_child_indices(shapes, "text_model.encoder.layers.")),
        inner=_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        projection=embedding[1],
        act="quick_gelu",
    )


def infer_open_clip_config(shapes: Shapes) -> dict[str, Any]:
    """CLIPTextConfig values of OpenCLIP-layout shapes (``token_embedding``, ``transformer.resblocks.N``)."""
    return _clip_config(
        embedding=_shape(shapes, "token_embedding.weight"),
        positions=_shape(shapes, "positional_embedding")[0],
        layers=len(_child_indices(shapes, "transformer.resblocks.")),
        inner=_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection=_shape(shapes, "text_projection")[1],
        act="gelu",
    )


def _plain(value: Any) -> Any:
    """JSON-shaped copy of a config value (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def diffusers_overrides(cls: type, actual: Mapping[str, Any], inferred: Mapping[str, Any]) -> dict[str, Any]:
    """The init arguments of diffusers class ``cls`` where ``actual`` differs from what loading infers."""
    overrides = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name not in actual or param.kind is param.VAR_KEYWORD:
            continue
        expected = inferred.get(name, param.default)
        if _plain(actual[name]) != _plain(expected):
            overrides[name] = _plain(actual[name])
    return overrides


def clip_overrides(
    actual: Mapping[str, Any], inferred: Mapping[str, Any], fields: Iterable[str] = CLIP_CONFIG_FIELDS
) -> dict[str, Any]:
    """The CLIPTextConfig ``fields`` where ``actual`` (a config dict) differs from ``inferred``."""
    from transformers import CLIPTextConfig

    expected = CLIPTextConfig(**inferred).to_dict()
    return {name: _plain(actual[name]) for name in fields if _plain(actual[name]) != _plain(expected[name])}


def read_overrides(metadata: Mapping[str, str], component: str) -> dict[str, Any]:
    """Config overrides stored as ``diffsplit.<component>`` metadata (a JSON object); {} if none."""
    text = metadata.get(METADATA_PREFIX + component)
    if text is None:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFileError(f"metadata {METADATA_PREFIX}{component} is not JSON: {error}") from error
    if not isinstance(overrides, dict):
        raise ModelFileError(f"metadata {METADATA_PREFIX}{component} is not a JSON object")
    return overrides


def write_overrides(component: str, overrides: Mapping[str, Any]) -> dict[str, str]:
    """Metadata entries storing ``overrides`` for ``component`` ({} when there are none)."""
    if not overrides:
        return {}
    return {METADATA_PREFIX + component: json.dumps(_plain(overrides), sort_keys=True)}
