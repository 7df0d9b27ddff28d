"""Depth Anything (v1 and v2) as one self-describing ``.safetensors`` file
(:mod:`diffsplit.engine.models.described_file`): the weights of transformers'
``DepthAnythingForDepthEstimation`` with its config in the file's metadata.

Depth Anything is a DINOv2 ViT backbone with a DPT head (the architecture of the
``DepthAnythingPreprocessor`` / ``DepthAnythingV2Preprocessor`` nodes of the common
ComfyUI preprocessor pack). The pack reads the original repository's ``.pth``
pickles; here a model file is a safetensors file (never a pickle) whose metadata
says ``diffsplit_architecture = "depth_anything"``; a file without it, a config of
another backbone or unbounded sizes, or weights that do not fit the config are refused
with the reason before any network is allocated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.models.described_file import Architecture, load_described, save_described

DEPTH_ANYTHING = "depth_anything"
#: the models kept loaded, by file (path, size, mtime): preprocessors run once per image
_CACHED_MODELS = 2


@dataclass(frozen=True, eq=False)
class DepthModel:
    """A loaded Depth Anything network and the patch size its input sides must be multiples of."""

    network: torch.nn.Module
    patch_size: int


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


def load_depth_model(path: Path) -> DepthModel:
    """The Depth Anything model of ``path`` (cached while the file is unchanged); ModelFileError names
    what is wrong with a file that is not one."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int) -> DepthModel:
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
