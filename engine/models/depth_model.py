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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.models.described_file import Architecture, load_described, save_described
from diffsplit.engine.models.ldm_keys import open_tensor_file

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
    from diffsplit.engine.models.depth_pack import is_pack_checkpoint, load_pack_checkpoint

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
