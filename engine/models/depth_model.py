"""Depth Anything (v1 and v2) as one self-describing ``.safetensors`` file
(:mod:`diffsplit.engine.models.described_file`): the weights of transformers'
``DepthAnythingForDepthEstimation`` with its config in the file's metadata.

Depth Anything is a DINOv2 ViT backbone with a DPT head (the architecture of the
``DepthAnythingPreprocessor`` / ``DepthAnythingV2Preprocessor`` nodes of the common
ComfyUI preprocessor pack). Two kinds of file are read:

- a diffsplit file: safetensors whose metadata says ``diffsplit_architecture = "depth_anything"``
  and holds the config; a config of another backbone or unbounded sizes, or weights that do not
  fit it, are refused with the reason before any network is allocated;
- the pack's own, the original repository's checkpoints (``depth_anything_vitl14.pth``,
  ``depth_anything_v2_vitl.pth``, ...; read with ``torch.load(weights_only=True)``, or safetensors
  of the same keys): the config comes from the shapes (width, depth, heads 64 wide, patch and
  position grid, DPT widths), the keys are renamed to transformers' (each block's fused ``qkv``
  split into query, key and value) and V1 feeds its head from the last four layers, V2 from its
  fixed ones; the same bounds and shape check apply.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.described_file import Architecture, check_config, load_described, save_described
from diffsplit.engine.models.ldm_keys import (
    TensorFile,
    assemble_module,
    build_on_meta,
    check_fit,
    open_tensor_file,
)

DEPTH_ANYTHING = "depth_anything"
#: the models kept loaded, by file (path, size, mtime): preprocessors run once per image
_CACHED_MODELS = 2


@dataclass(frozen=True, eq=False)
class DepthModel:
    """A loaded Depth Anything network, the patch size its input sides must be multiples of, and
    whether it is fed as the pack feeds its own checkpoints (``pack_pipeline``: the short side at
    518 px whatever the resolution)."""

    network: torch.nn.Module
    patch_size: int
    pack_pipeline: bool = False


def tiny_depth_config() -> dict[str, Any]:
    """A tiny Depth Anything config: the real layout (4-stage DINOv2 backbone, DPT neck and head), few
    channels."""
    from transformers import DepthAnythingConfig, Dinov2Config

    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=70, out_features=stages, reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                                 patch_size=14, depth_estimation_type="relative")
    return config.to_dict()


def depth_network(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained Depth Anything network of ``config`` (in eval mode)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    return DepthAnythingForDepthEstimation(DepthAnythingConfig.from_dict(config)).eval()


ARCHITECTURE = Architecture(name=DEPTH_ANYTHING, label="Depth Anything", model_type="depth_anything",
                            backbone_types=("dinov2",), build=depth_network)


def save_depth_model(path: Path, network: torch.nn.Module) -> Path:
    """Write ``network`` (a DepthAnythingForDepthEstimation) as a self-describing safetensors file."""
    return save_described(path, network, ARCHITECTURE)


def load_depth_model(path: Path, version: int = 1) -> DepthModel:
    """The Depth Anything model of ``path`` (cached while the file is unchanged): a diffsplit file, or
    the original repository's checkpoint (``version``: 1 or 2, which layers feed its head);
    ModelFileError names what is wrong with a file that is neither."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns, version)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int, version: int) -> DepthModel:
    with open_tensor_file(Path(path)) as source:
        if is_pack_checkpoint(source.shapes):
            return load_pack_checkpoint(source, version, Path(path).name)
    described = load_described(Path(path), ARCHITECTURE)
    return DepthModel(network=described.network, patch_size=int(described.config.get("patch_size", 14)))


def write_tiny_depth_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny seeded Depth Anything file; returns ``path``."""
    generator = torch.Generator().manual_seed(seed)
    network = depth_network(tiny_depth_config())
    with torch.no_grad():
        for _, parameter in sorted(network.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return save_depth_model(path, network)


# the pack's own files: the original repository's checkpoints (depth_anything_vitl14.pth, ...)

_PACK_PREFIX = re.compile(r"^(module\.)?")
_PACK_BLOCK = re.compile(r"^pretrained\.blocks\.(\d+)\.")
#: DINOv2's attention heads are 64 wide in every size the pack ships
_HEAD_WIDTH = 64
#: which backbone layers feed the DPT head (transformers' 1-based out_indices): V1 takes the last
#: four, V2 fixed ones per depth (its ViT-S/B at 12 layers, ViT-L at 24, ViT-G at 40)
_V2_LAYERS = {12: [3, 6, 9, 12], 24: [5, 12, 18, 24], 40: [10, 20, 30, 40]}
_PACK_HEAD = {
    "depth_head.scratch.output_conv1.": "head.conv1.",
    "depth_head.scratch.output_conv2.0.": "head.conv2.",
    "depth_head.scratch.output_conv2.2.": "head.conv3.",
}


def is_pack_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a file's keys are those of the original Depth Anything repository's checkpoints."""
    keys = {_PACK_PREFIX.sub("", key) for key in shapes}
    return "pretrained.cls_token" in keys and "depth_head.scratch.output_conv1.weight" in keys


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, name: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"{name}: a Depth Anything checkpoint needs {key}, which it does not have")
    return shapes[key]


def pack_config(shapes: Mapping[str, tuple[int, ...]], version: int, name: str) -> dict[str, Any]:
    """The transformers config of an original checkpoint, from its shapes (``version`` 1 or 2: which
    layers feed the head)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    hidden = _shape(shapes, "pretrained.cls_token", name)[-1]
    patch = _shape(shapes, "pretrained.patch_embed.proj.weight", name)
    positions = _shape(shapes, "pretrained.pos_embed", name)[1] - 1
    layers = 1 + max((int(m[1]) for key in shapes if (m := _PACK_BLOCK.match(key))), default=-1)
    side = math.isqrt(positions)
    if layers < 4 or side * side != positions or hidden % _HEAD_WIDTH or len(patch) != 4:
        raise ModelFileError(f"{name}: {layers} blocks of width {hidden} over {positions} positions are not "
                             "a DINOv2 backbone Depth Anything uses")
    if version == 2 and layers not in _V2_LAYERS:
        raise ModelFileError(f"{name}: Depth Anything V2 feeds its head from fixed layers of a 12-, 24- or "
                             f"40-layer backbone, not a {layers}-layer one")
    out_indices = _V2_LAYERS[layers] if version == 2 else list(range(layers - 3, layers + 1))
    backbone = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // _HEAD_WIDTH,
        intermediate_size=_shape(shapes, "pretrained.blocks.0.mlp.fc1.weight", name)[0],
        patch_size=patch[-1], image_size=patch[-1] * side, out_indices=out_indices, apply_layernorm=True,
        reshape_hidden_states=False)
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=hidden, patch_size=patch[-1],
        neck_hidden_sizes=[_shape(shapes, f"depth_head.projects.{i}.weight", name)[0] for i in range(4)],
        fusion_hidden_size=_shape(shapes, "depth_head.scratch.layer1_rn.weight", name)[0],
        head_hidden_size=_shape(shapes, "depth_head.scratch.output_conv2.0.weight", name)[0],
        depth_estimation_type="relative")
    return check_config(config.to_dict(), ARCHITECTURE, name)


@dataclass(frozen=True)
class AttentionNames:
    """What this transformers version calls a DINOv2 layer's attention projections."""

    query: str
    key: str
    value: str
    out: str


#: transformers' older and newer names
_ATTENTION_NAMES = (AttentionNames("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                   "attention.o_proj"),
                    AttentionNames("attention.attention.query", "attention.attention.key",
                                   "attention.attention.value", "attention.output.dense"))


def attention_names(network: torch.nn.Module) -> AttentionNames:
    """The names ``network``'s first layer uses for its attention projections."""
    keys = set(network.state_dict())
    for names in _ATTENTION_NAMES:
        if f"backbone.encoder.layer.0.{names.query}.weight" in keys:
            return names
    raise ModelFileError("this transformers' DINOv2 names its attention in a way diffsplit does not know")


def pack_key(key: str, names: AttentionNames) -> str | None:
    """The transformers key of an original checkpoint key (None for a block's fused ``attn.qkv``,
    which :func:`_pack_state` splits)."""
    if match := _PACK_BLOCK.match(key):
        rest = key[match.end():]
        if rest.startswith("attn.qkv."):
            return None
        layer = f"backbone.encoder.layer.{match[1]}."
        for old, new in (("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
                         ("attn.proj.", f"{names.out}.")):
            if rest.startswith(old):
                return layer + new + rest[len(old):]
        return layer + rest
    fixed = {"pretrained.cls_token": "backbone.embeddings.cls_token",
             "pretrained.mask_token": "backbone.embeddings.mask_token",
             "pretrained.pos_embed": "backbone.embeddings.position_embeddings"}
    if key in fixed:
        return fixed[key]
    for old, new in (("pretrained.patch_embed.proj.", "backbone.embeddings.patch_embeddings.projection."),
                     ("pretrained.norm.", "backbone.layernorm."), *_PACK_HEAD.items()):
        if key.startswith(old):
            return new + key[len(old):]
    if match := re.match(r"^depth_head\.projects\.(\d)\.(.*)$", key):
        return f"neck.reassemble_stage.layers.{match[1]}.projection.{match[2]}"
    if match := re.match(r"^depth_head\.resize_layers\.(\d)\.(.*)$", key):
        return f"neck.reassemble_stage.layers.{match[1]}.resize.{match[2]}"
    if match := re.match(r"^depth_head\.scratch\.layer(\d)_rn\.(.*)$", key):
        return f"neck.convs.{int(match[1]) - 1}.{match[2]}"
    if match := re.match(r"^depth_head\.scratch\.refinenet(\d)\.(.*)$", key):
        fusion = f"neck.fusion_stage.layers.{4 - int(match[1])}."  # refinenet4 is the deepest, fused first
        rest = match[2]
        for old, new in (("out_conv.", "projection."), ("resConfUnit1.conv", "residual_layer1.convolution"),
                         ("resConfUnit2.conv", "residual_layer2.convolution")):
            if rest.startswith(old):
                return fusion + new + rest[len(old):]
    return key  # left as it is: the shape check names it


def _pack_state(source: TensorFile, hidden: int, names: AttentionNames) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key in source.shapes:
        short = _PACK_PREFIX.sub("", key)
        target = pack_key(short, names)
        tensor = source.read(key).float()
        if target is not None:
            state[target] = tensor
            continue
        match = _PACK_BLOCK.match(short)
        assert match is not None
        part = short.rsplit(".", 1)[1]  # weight or bias: query, key, value in that order
        for index, name in enumerate((names.query, names.key, names.value)):
            piece = tensor[index * hidden: (index + 1) * hidden]
            state[f"backbone.encoder.layer.{match[1]}.{name}.{part}"] = piece
    return state


def pack_shapes(shapes: Mapping[str, tuple[int, ...]], names: AttentionNames) -> dict[str, tuple[int, ...]]:
    """The transformers keys and shapes an original checkpoint's tensors become (qkv split in three)."""
    renamed: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        short = _PACK_PREFIX.sub("", key)
        target = pack_key(short, names)
        if target is not None:
            renamed[target] = shape
            continue
        match = _PACK_BLOCK.match(short)
        assert match is not None
        part = short.rsplit(".", 1)[1]
        third = (shape[0] // 3, *shape[1:])
        for name in (names.query, names.key, names.value):
            renamed[f"backbone.encoder.layer.{match[1]}.{name}.{part}"] = third
    return renamed


def load_pack_checkpoint(source: TensorFile, version: int, name: str) -> DepthModel:
    """The network of an original Depth Anything checkpoint (its shapes checked against the config
    built from them on the meta device before anything is allocated)."""
    shapes = {_PACK_PREFIX.sub("", key): shape for key, shape in source.shapes.items()}
    config = pack_config(shapes, version, name)
    skeleton = build_on_meta(lambda: depth_network(config))
    names = attention_names(skeleton)
    check_fit(skeleton, pack_shapes(source.shapes, names), f"{name}: its weights do not fit a Depth Anything "
              f"of width {config['reassemble_hidden_size']}")
    hidden = int(config["reassemble_hidden_size"])
    network = assemble_module(skeleton, _pack_state(source, hidden, names), source.path)
    return DepthModel(network=network, patch_size=int(config["patch_size"]), pack_pipeline=True)
