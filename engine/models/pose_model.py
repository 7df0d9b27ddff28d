"""The body-pose network of the common preprocessor pack's OpenposePreprocessor: the CMU OpenPose
COCO body model (``body_pose_model.pth``), read from its own files' keys.

Layout (the pack's, in the Caffe layer names its file keeps):

- a VGG-19 front, ``conv1_1`` .. ``conv4_2`` (3x3 convs, ReLU, 2x2 max pools after ``conv1_2``,
  ``conv2_2`` and ``conv3_4``), then ``conv4_3_CPM`` and ``conv4_4_CPM``: the image features, at
  1/8 of the input's size;
- stage 1: two branches of 3x3 convs ``conv5_{1,2,3}_CPM_L{1,2}``, a 1x1 ``conv5_4_CPM_L{1,2}`` and a
  last 1x1 ``conv5_5_CPM_L{1,2}`` without ReLU: branch L1 predicts the 38 part affinity fields (an
  x and y map for each of 19 limbs), branch L2 the 19 heat maps (18 body parts and the background);
- stages 2..6: the same two branches on ``[fields, heat maps, features]``, each seven convs
  ``Mconv{1..7}_stage{s}_L{1,2}`` (five 7x7, then two 1x1, the last without ReLU).

Keys are ``<layer>.weight`` / ``<layer>.bias``; a state dict of the pack's module (``model0.conv1_1``,
``model2_1.Mconv1_stage2_L1``, ...) loads too. Every conv's channels come from its weight's shape
and are checked to chain (so a tiny file of the same layout loads, and a file that is not one is
refused before a network is built). Files are read as safetensors or, for the pack's ``.pth``,
with ``torch.load(weights_only=True)`` (never an arbitrary pickle).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.engine.models.safetensors_io import save_file_sorted
from torch import nn

#: 19 limbs x (x, y)
FIELD_CHANNELS = 38
#: 18 COCO body parts and the background
HEATMAP_CHANNELS = 19
STAGES = 6
#: the widest conv a file may declare (the real models' widest is 512): bounds the activations
MAX_CHANNELS = 1024
_CACHED_MODELS = 2
MODULE_PREFIX = re.compile(r"^(?:model\d(?:_\d)?|convs)\.")


@dataclass(frozen=True)
class ConvLayer:
    """One conv of an OpenPose network: its Caffe name, square kernel, ReLU and 2x2 max pool after."""

    name: str
    kernel: int
    relu: bool = True
    pool_after: bool = False


def _front() -> tuple[ConvLayer, ...]:
    layers = [ConvLayer("conv1_1", 3), ConvLayer("conv1_2", 3, pool_after=True),
              ConvLayer("conv2_1", 3), ConvLayer("conv2_2", 3, pool_after=True)]
    layers += [ConvLayer(f"conv3_{i}", 3, pool_after=i == 4) for i in range(1, 5)]
    layers += [ConvLayer(name, 3) for name in ("conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM")]
    return tuple(layers)


def _branch(stage: int, branch: int) -> tuple[ConvLayer, ...]:
    if stage == 1:
        return (*(ConvLayer(f"conv5_{i}_CPM_L{branch}", 3) for i in range(1, 4)),
                ConvLayer(f"conv5_4_CPM_L{branch}", 1), ConvLayer(f"conv5_5_CPM_L{branch}", 1, relu=False))
    return (*(ConvLayer(f"Mconv{i}_stage{stage}_L{branch}", 7) for i in range(1, 6)),
            ConvLayer(f"Mconv6_stage{stage}_L{branch}", 1),
            ConvLayer(f"Mconv7_stage{stage}_L{branch}", 1, relu=False))


FRONT = _front()
BRANCHES: tuple[tuple[tuple[ConvLayer, ...], tuple[ConvLayer, ...]], ...] = tuple(
    (_branch(stage, 1), _branch(stage, 2)) for stage in range(1, STAGES + 1)
)


def run_layers(layers: tuple[ConvLayer, ...], convs: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``layers`` (their convs in ``convs``, by name)."""
    for layer in layers:
        x = convs[layer.name](x)
        if layer.relu:
            x = torch.relu(x)
        if layer.pool_after:
            x = torch.nn.functional.max_pool2d(x, 2, 2)
    return x


class BodyPoseNetwork(nn.Module):
    """RGB scaled to [-0.5, 0.5) → (part affinity fields, heat maps), both at 1/8 of the input's size."""

    def __init__(self, channels: Mapping[str, tuple[int, int]]) -> None:
        """``channels`` maps each layer name to its (in, out) channels (see :func:`layer_channels`)."""
        super().__init__()
        kernels = {layer.name: layer.kernel for layer in _all_layers()}
        self.convs = nn.ModuleDict({
            name: nn.Conv2d(channels[name][0], channels[name][1], kernels[name], padding=kernels[name] // 2)
            for name in kernels
        })

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = run_layers(FRONT, self.convs, x)
        stage_input = features
        fields = heatmaps = features
        for field_branch, heatmap_branch in BRANCHES:
            fields = run_layers(field_branch, self.convs, stage_input)
            heatmaps = run_layers(heatmap_branch, self.convs, stage_input)
            stage_input = torch.cat([fields, heatmaps, features], dim=1)
        return fields, heatmaps

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the pack file's keys (``conv1_1.weight``, ...)."""
        return {key.removeprefix("convs."): value for key, value in self.state_dict().items()}


def _all_layers() -> tuple[ConvLayer, ...]:
    return FRONT + tuple(layer for pair in BRANCHES for branch in pair for layer in branch)


def layer_channels(shapes: Mapping[str, tuple[int, ...]], name: str = "the file"
                   ) -> dict[str, tuple[int, int]]:
    """Each layer's (in, out) channels from the weights' shapes, checked to form the OpenPose body layout;
    ModelFileError says what does not fit."""
    channels = conv_channels(shapes, _all_layers(), "OpenPose body model", name)
    check_chain(FRONT, channels, 3, name)
    features = channels[FRONT[-1].name][1]
    stage_input = features
    for stage, (field_branch, heatmap_branch) in enumerate(BRANCHES, start=1):
        check_chain(field_branch, channels, stage_input, name)
        check_chain(heatmap_branch, channels, stage_input, name)
        for branch, expected in ((field_branch, FIELD_CHANNELS), (heatmap_branch, HEATMAP_CHANNELS)):
            if channels[branch[-1].name][1] != expected:
                raise ModelFileError(f"{name}: {branch[-1].name} gives {channels[branch[-1].name][1]} maps, "
                                     f"an OpenPose body model gives {expected} (stage {stage})")
        stage_input = FIELD_CHANNELS + HEATMAP_CHANNELS + features
    return channels


def conv_channels(shapes: Mapping[str, tuple[int, ...]], layers: tuple[ConvLayer, ...], label: str,
                  name: str) -> dict[str, tuple[int, int]]:
    """Each of ``layers``' (in, out) channels from its weight's shape; ModelFileError naming a missing or
    misshapen conv of the ``label`` network."""
    channels: dict[str, tuple[int, int]] = {}
    for layer in layers:
        shape = shapes.get(f"{layer.name}.weight")
        if shape is None or len(shape) != 4 or shape[2:] != (layer.kernel, layer.kernel):
            raise ModelFileError(f"{name} is not an {label}: no {layer.kernel}x{layer.kernel} conv "
                                 f"{layer.name}")
        if shapes.get(f"{layer.name}.bias") != (shape[0],):
            raise ModelFileError(f"{name}: {layer.name}.bias does not match its weight")
        if max(shape[:2]) > MAX_CHANNELS:
            raise ModelFileError(f"{name}: {layer.name} has {shape[1]} -> {shape[0]} channels, over the "
                                 f"{MAX_CHANNELS} an OpenPose network is allowed")
        channels[layer.name] = (shape[1], shape[0])
    return channels


def file_keys(keys: Iterable[str]) -> dict[str, str]:
    """Layer key (``conv1_1.weight``) → the file's key, whether the file holds the pack's layer names or a
    state dict of its module (``model0.conv1_1.weight``, ``model1_0.``, ``model2.``)."""
    return {MODULE_PREFIX.sub("", key): key for key in keys}


def save_seeded(network: nn.Module, path: Path, seed: int) -> Path:
    """Fill ``network``'s parameters with seeded, fan-in-scaled noise and write its file layout
    (``file_state_dict``) as safetensors; returns ``path``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(network.named_parameters()):
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (1.5 / fan_in) ** 0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = network.file_state_dict()  # type: ignore[operator]
    save_file_sorted({key: value.contiguous() for key, value in state.items()}, path)
    return path


def check_chain(layers: tuple[ConvLayer, ...], channels: Mapping[str, tuple[int, int]], first_in: int,
                name: str) -> None:
    """ModelFileError unless each of ``layers`` takes the channels the one before gives."""
    expected = first_in
    for layer in layers:
        got = channels[layer.name][0]
        if got != expected:
            raise ModelFileError(f"{name}: {layer.name} takes {got} channels where the layer before gives "
                                 f"{expected}")
        expected = channels[layer.name][1]


def load_body_pose_model(path: Path) -> BodyPoseNetwork:
    """The body-pose network of ``path`` (cached while the file is unchanged); ModelFileError names what
    is wrong with a file that is not one."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int) -> BodyPoseNetwork:
    file_name = Path(path).name
    with open_tensor_file(Path(path)) as source:
        keys = file_keys(source.shapes)
        shapes = {short: source.shapes[key] for short, key in keys.items()}
        channels = layer_channels(shapes, file_name)
        expected = {f"{layer.name}.{part}" for layer in _all_layers() for part in ("weight", "bias")}
        extra = sorted(set(shapes) - expected)
        if extra:
            raise ModelFileError(f"{file_name}: keys an OpenPose body model does not have: {extra[:3]}")
        network = BodyPoseNetwork(channels).eval()
        network.load_state_dict({f"convs.{short}": source.read(key) for short, key in keys.items()},
                                strict=True)
    return network


def write_tiny_body_pose_model(path: Path, seed: int = 0) -> Path:
    """A seeded body-pose network of the real layout with few channels, as a safetensors file; returns
    ``path``."""
    front_widths = {"conv1": 4, "conv2": 8, "conv3": 8, "conv4": 8}
    channels: dict[str, tuple[int, int]] = {}
    previous = 3
    for layer in FRONT:
        out = 8 if layer.name.endswith("CPM") else front_widths[layer.name[:5]]
        channels[layer.name] = (previous, out)
        previous = out
    stage_input = previous
    for field_branch, heatmap_branch in BRANCHES:
        for branch, last in ((field_branch, FIELD_CHANNELS), (heatmap_branch, HEATMAP_CHANNELS)):
            width = stage_input
            for index, layer in enumerate(branch):
                out = last if index == len(branch) - 1 else 4
                channels[layer.name] = (width, out)
                width = out
        stage_input = FIELD_CHANNELS + HEATMAP_CHANNELS + previous
    return save_seeded(BodyPoseNetwork(channels), path, seed)
