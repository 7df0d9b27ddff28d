"""The hand and face networks of the common preprocessor pack's OpenposePreprocessor
(``hand_pose_model.pth``, ``facenet.pth``): CMU OpenPose's one-branch keypoint models, read from their
own files' keys.

Both share one layout (the pack's, in the Caffe layer names its files keep):

- a VGG-19 front, ``conv1_1`` .. ``conv5_2`` (3x3 convs, ReLU, 2x2 max pools after ``conv1_2``,
  ``conv2_2`` and ``conv3_4``), then ``conv5_3_CPM``: the features, at 1/8 of the input's size;
- stage 1: ``conv6_1_CPM`` (1x1, ReLU) and ``conv6_2_CPM`` (1x1), the first heat maps;
- stages 2..6 on ``[heat maps, features]``: ``Mconv{1..7}_stage{s}`` (five 7x7, then two 1x1, the
  last without ReLU).

The hand model gives 22 heat maps (21 hand points and the background), the face model 71 (70
landmarks and the background); the last stage's maps are the output. A state dict of the pack's hand
module (``model1_0.conv1_1``, ``model2.Mconv1_stage2``, ...) loads too. Every conv's channels come
from its weight's shape and are checked to chain, so a tiny file of the same layout loads and a file
that is not one is refused before a network is built. Files are read as safetensors or, for the
pack's ``.pth``, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.engine.models.pose_model import (
    ConvLayer,
    check_chain,
    conv_channels,
    file_keys,
    run_layers,
    save_seeded,
)
from torch import nn

HAND_MAPS = 22
FACE_MAPS = 71
STAGES = 6
_CACHED_MODELS = 4


@dataclass(frozen=True)
class KeypointKind:
    """Which of the two networks a file must be: its name in messages and its heat-map count."""

    label: str
    maps: int


HAND = KeypointKind("OpenPose hand model", HAND_MAPS)
FACE = KeypointKind("OpenPose face model", FACE_MAPS)


def _front() -> tuple[ConvLayer, ...]:
    pools = {"conv1_2", "conv2_2", "conv3_4"}
    names = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
             "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3_CPM")
    return tuple(ConvLayer(name, 3, pool_after=name in pools) for name in names)


def _stage(stage: int) -> tuple[ConvLayer, ...]:
    if stage == 1:
        return ConvLayer("conv6_1_CPM", 1), ConvLayer("conv6_2_CPM", 1, relu=False)
    return (*(ConvLayer(f"Mconv{i}_stage{stage}", 7) for i in range(1, 6)),
            ConvLayer(f"Mconv6_stage{stage}", 1), ConvLayer(f"Mconv7_stage{stage}", 1, relu=False))


FRONT = _front()
STAGE_LAYERS = tuple(_stage(stage) for stage in range(1, STAGES + 1))
_ALL = FRONT + tuple(layer for stage in STAGE_LAYERS for layer in stage)


class KeypointNetwork(nn.Module):
    """BGR scaled to [-0.5, 0.5) → the last stage's heat maps, at 1/8 of the input's size."""

    def __init__(self, channels: Mapping[str, tuple[int, int]]) -> None:
        super().__init__()
        self.convs = nn.ModuleDict({
            layer.name: nn.Conv2d(*channels[layer.name], layer.kernel, padding=layer.kernel // 2)
            for layer in _ALL
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = run_layers(FRONT, self.convs, x)
        maps = run_layers(STAGE_LAYERS[0], self.convs, features)
        for stage in STAGE_LAYERS[1:]:
            maps = run_layers(stage, self.convs, torch.cat([maps, features], dim=1))
        return maps

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the pack file's keys (``conv1_1.weight``, ...)."""
        return {key.removeprefix("convs."): value for key, value in self.state_dict().items()}


def keypoint_channels(shapes: Mapping[str, tuple[int, ...]], kind: KeypointKind, name: str
                      ) -> dict[str, tuple[int, int]]:
    """Each layer's (in, out) channels from the weights' shapes, checked to form ``kind``'s layout."""
    channels = conv_channels(shapes, _ALL, kind.label, name)
    check_chain(FRONT, channels, 3, name)
    features = channels[FRONT[-1].name][1]
    check_chain(STAGE_LAYERS[0], channels, features, name)
    for number, stage in enumerate(STAGE_LAYERS, start=1):
        if number > 1:
            check_chain(stage, channels, kind.maps + features, name)
        if channels[stage[-1].name][1] != kind.maps:
            raise ModelFileError(f"{name}: {stage[-1].name} gives {channels[stage[-1].name][1]} maps, an "
                                 f"{kind.label} gives {kind.maps}")
    return channels


def load_keypoint_model(path: Path, kind: KeypointKind) -> KeypointNetwork:
    """The hand or face network of ``path`` (cached while the file is unchanged); ModelFileError names
    what is wrong with a file that is not one."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns, kind)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int, kind: KeypointKind) -> KeypointNetwork:
    file_name = Path(path).name
    with open_tensor_file(Path(path)) as source:
        keys = file_keys(source.shapes)
        shapes = {short: source.shapes[key] for short, key in keys.items()}
        channels = keypoint_channels(shapes, kind, file_name)
        known = {f"{layer.name}.{part}" for layer in _ALL for part in ("weight", "bias")}
        extra = sorted(set(shapes) - known)
        if extra:
            raise ModelFileError(f"{file_name}: keys an {kind.label} does not have: {extra[:3]}")
        network = KeypointNetwork(channels).eval()
        network.load_state_dict({f"convs.{short}": source.read(key).float() for short, key in keys.items()},
                                strict=True)
    return network


def write_tiny_keypoint_model(path: Path, kind: KeypointKind, seed: int = 0) -> Path:
    """A seeded hand or face network of the real layout with few channels, as a safetensors file;
    returns ``path``."""
    channels: dict[str, tuple[int, int]] = {}
    previous = 3
    for layer in FRONT:
        out = 8 if layer.name == "conv5_3_CPM" else 4 if layer.name.startswith("conv1") else 8
        channels[layer.name] = (previous, out)
        previous = out
    features = previous
    for number, stage in enumerate(STAGE_LAYERS, start=1):
        width = features if number == 1 else kind.maps + features
        for index, layer in enumerate(stage):
            out = kind.maps if index == len(stage) - 1 else 4
            channels[layer.name] = (width, out)
            width = out
    return save_seeded(KeypointNetwork(channels), path, seed)
