"""The common preprocessor pack's own Depth Anything files: the original repository's checkpoints
(``depth_anything_vitl14.pth``, ``depth_anything_v2_vitl.pth``, ...), read into transformers'
``DepthAnythingForDepthEstimation`` (:mod:`diffsplit.engine.models.depth_model`).

Their keys are the DINOv2 ViT's (``pretrained.*``) and the DPT head's (``depth_head.*``). The config
comes from the shapes: width (the class token), depth (the blocks), heads 64 wide (every DINOv2 the
pack ships), patch size, position grid (``image_size``), feed-forward ratio, and the DPT widths; it
is bounded like a diffsplit file's before anything is built. The keys are renamed as transformers'
own conversion renames them (each block's fused ``attn.qkv`` split into query, key and value rows)
and the shapes are compared on the meta device before the weights are placed. V1 feeds its head
from the last four layers, V2 from fixed ones (its ViT-S/B at 12 layers, ViT-L at 24; ViT-G's
SwiGLU blocks are not read).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.depth_model import ARCHITECTURE, DepthModel, depth_network
from diffsplit.engine.models.described_file import MAX_LAYERS, check_config
from diffsplit.engine.models.ldm_keys import TensorFile, assemble_module, build_on_meta, check_fit

_PREFIX = re.compile(r"^(module\.)?")
_BLOCK = re.compile(r"^pretrained\.blocks\.(\d{1,4})\.")
#: DINOv2's attention heads are 64 wide in every size the pack ships
HEAD_WIDTH = 64
MAX_MLP_RATIO = 8
#: which backbone layers feed the DPT head in V2 (transformers' 1-based out_indices), by depth
V2_LAYERS = {12: [3, 6, 9, 12], 24: [5, 12, 18, 24]}
_HEAD = {
    "depth_head.scratch.output_conv1.": "head.conv1.",
    "depth_head.scratch.output_conv2.0.": "head.conv2.",
    "depth_head.scratch.output_conv2.2.": "head.conv3.",
}
_FIXED = {"pretrained.cls_token": "backbone.embeddings.cls_token",
          "pretrained.mask_token": "backbone.embeddings.mask_token",
          "pretrained.pos_embed": "backbone.embeddings.position_embeddings"}
_PREFIXES = (("pretrained.patch_embed.proj.", "backbone.embeddings.patch_embeddings.projection."),
             ("pretrained.norm.", "backbone.layernorm."), *_HEAD.items())


@dataclass(frozen=True)
class AttentionNames:
    """What this transformers version calls a DINOv2 layer's attention projections."""

    query: str
    key: str
    value: str
    out: str


#: transformers' newer and older names
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


def is_pack_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a file's keys are those of the original Depth Anything repository's checkpoints."""
    keys = {_PREFIX.sub("", key) for key in shapes}
    return "pretrained.cls_token" in keys and "depth_head.scratch.output_conv1.weight" in keys


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, dims: int, name: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None or len(shape) != dims or min(shape, default=1) < 1:
        raise ModelFileError(f"{name}: a Depth Anything checkpoint needs a {dims}-d {key} of non-empty "
                             f"sides, not {shape}")
    return shape


def pack_config(shapes: Mapping[str, tuple[int, ...]], version: int, name: str) -> dict[str, Any]:
    """The transformers config of an original checkpoint, from its (prefix-free) shapes (``version`` 1
    or 2: which layers feed the head); ModelFileError when they describe none or one over the bounds."""
    from transformers import DepthAnythingConfig, Dinov2Config

    hidden = _shape(shapes, "pretrained.cls_token", 3, name)[-1]
    patch = _shape(shapes, "pretrained.patch_embed.proj.weight", 4, name)
    positions = _shape(shapes, "pretrained.pos_embed", 3, name)[1] - 1
    layers = 1 + max((int(m[1]) for key in shapes if (m := _BLOCK.match(key))), default=-1)
    side = math.isqrt(max(positions, 0))
    mlp = _shape(shapes, "pretrained.blocks.0.mlp.fc1.weight", 2, name)[0]
    fits = (4 <= layers <= MAX_LAYERS and side >= 1 and side * side == positions
            and hidden % HEAD_WIDTH == 0 and mlp % hidden == 0 and mlp <= MAX_MLP_RATIO * hidden)
    if not fits:
        raise ModelFileError(f"{name}: {layers} blocks of width {hidden} (feed-forward {mlp}) over "
                             f"{positions} positions are not a DINOv2 backbone Depth Anything uses "
                             f"(4..{MAX_LAYERS} blocks, heads {HEAD_WIDTH} wide, a square grid)")
    if version == 2 and layers not in V2_LAYERS:
        raise ModelFileError(f"{name}: Depth Anything V2 feeds its head from fixed layers of a 12- or "
                             f"24-layer backbone, not a {layers}-layer one")
    out_indices = V2_LAYERS[layers] if version == 2 else list(range(layers - 3, layers + 1))
    try:
        backbone = Dinov2Config(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // HEAD_WIDTH,
            mlp_ratio=mlp // hidden, patch_size=patch[-1], image_size=patch[-1] * side,
            out_indices=out_indices, apply_layernorm=True, reshape_hidden_states=False)
        config = DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=hidden, patch_size=patch[-1],
            neck_hidden_sizes=[_shape(shapes, f"depth_head.projects.{i}.weight", 4, name)[0]
                               for i in range(4)],
            fusion_hidden_size=_shape(shapes, "depth_head.scratch.layer1_rn.weight", 4, name)[0],
            head_hidden_size=_shape(shapes, "depth_head.scratch.output_conv2.0.weight", 4, name)[0],
            depth_estimation_type="relative")
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{name}: its shapes make no Depth Anything config: {exc}") from None
    return check_config(config.to_dict(), ARCHITECTURE, name)


def _regex_key(key: str) -> str | None:
    if match := re.match(r"^depth_head\.projects\.(\d)\.(.*)$", key):
        return f"neck.reassemble_stage.layers.{match[1]}.projection.{match[2]}"
    if match := re.match(r"^depth_head\.resize_layers\.(\d)\.(.*)$", key):
        return f"neck.reassemble_stage.layers.{match[1]}.resize.{match[2]}"
    if match := re.match(r"^depth_head\.scratch\.layer([1-4])_rn\.(.*)$", key):
        return f"neck.convs.{int(match[1]) - 1}.{match[2]}"
    if match := re.match(r"^depth_head\.scratch\.refinenet([1-4])\.(.*)$", key):
        fusion = f"neck.fusion_stage.layers.{4 - int(match[1])}."  # refinenet4 is the deepest, fused first
        for old, new in (("out_conv.", "projection."), ("resConfUnit1.conv", "residual_layer1.convolution"),
                         ("resConfUnit2.conv", "residual_layer2.convolution")):
            if match[2].startswith(old):
                return fusion + new + match[2][len(old):]
    return None


def pack_key(key: str, names: AttentionNames) -> str | None:
    """The transformers key of an original checkpoint key; None for a block's fused ``attn.qkv`` (split
    by the caller). A key of neither layout comes back as it is, for the shape check to name."""
    if match := _BLOCK.match(key):
        rest = key[match.end():]
        if rest.startswith("attn.qkv."):
            return None
        layer = f"backbone.encoder.layer.{match[1]}."
        for old, new in (("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
                         ("attn.proj.", f"{names.out}.")):
            if rest.startswith(old):
                return layer + new + rest[len(old):]
        return layer + rest
    if key in _FIXED:
        return _FIXED[key]
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return _regex_key(key) or key


def _renamed(shapes: Mapping[str, tuple[int, ...]], hidden: int, names: AttentionNames,
             split: Callable[[str, int], Any]) -> dict[str, Any]:
    """Each file key's targets: ``split(key, part)`` gives the value of query/key/value part 0..2 of a
    fused ``qkv`` (which must have 3 x hidden rows, else it keeps its own key and fails the check)."""
    renamed: dict[str, Any] = {}
    for key, shape in shapes.items():
        short = _PREFIX.sub("", key)
        target = pack_key(short, names)
        match = _BLOCK.match(short)
        if target is not None or match is None or not shape or shape[0] != 3 * hidden:
            renamed[target or short] = split(key, -1)
            continue
        part = short.rsplit(".", 1)[1]  # weight or bias
        for index, name in enumerate((names.query, names.key, names.value)):
            renamed[f"backbone.encoder.layer.{match[1]}.{name}.{part}"] = split(key, index)
    return renamed


def load_pack_checkpoint(source: TensorFile, version: int, name: str) -> DepthModel:
    """The network of an original Depth Anything checkpoint (its shapes checked against the config
    built from them, on the meta device, before anything is allocated)."""
    shapes = {_PREFIX.sub("", key): shape for key, shape in source.shapes.items()}
    config = pack_config(shapes, version, name)
    hidden = int(config["reassemble_hidden_size"])
    try:
        skeleton = build_on_meta(lambda: depth_network(config))
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as exc:
        raise ModelFileError(f"{name}: its Depth Anything config does not build: {exc}") from None
    names = attention_names(skeleton)

    def shape_of(key: str, part: int) -> tuple[int, ...]:
        shape = source.shapes[key]
        return shape if part < 0 else (shape[0] // 3, *shape[1:])

    check_fit(skeleton, _renamed(source.shapes, hidden, names, shape_of),
              f"{name}: its weights do not fit a Depth Anything of width {hidden}")

    read: dict[str, torch.Tensor] = {}

    def tensor_of(key: str, part: int) -> torch.Tensor:
        if part < 0:
            return source.read(key).float()
        if part == 0:
            read[key] = source.read(key).float()  # a fused qkv, read once for its three parts
        piece = read[key][part * hidden: (part + 1) * hidden].clone()
        if part == 2:
            del read[key]
        return piece

    network = assemble_module(skeleton, _renamed(source.shapes, hidden, names, tensor_of), source.path)
    return DepthModel(network=network, patch_size=int(config["patch_size"]), pack_pipeline=True)
