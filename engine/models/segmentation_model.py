"""UperNet semantic segmentation as one self-describing ``.safetensors`` file
(:mod:`diffsplit.engine.models.described_file`): the weights of transformers'
``UperNetForSemanticSegmentation`` with its config, and the colour of each label, in the file's
metadata.

UperNet (a pyramid-pooling and feature-pyramid head over a four-stage backbone) is the head of the
common preprocessor pack's ``UniFormer-SemSegPreprocessor`` / ``SemSegPreprocessor`` model. Two kinds
of file are read: the pack's own, UperNet on a UniFormer backbone as an mmsegmentation checkpoint
(``upernet_global_small.pth``, or a safetensors file with its keys;
:mod:`diffsplit.engine.models.uniformer`), and UperNet on a ConvNeXt backbone as transformers ships
it (ADE20K-trained ones included, converted with :func:`save_segmentation_model`). ``palette`` in the
metadata (or the ``PALETTE`` an mmsegmentation checkpoint carries) is a JSON list of ``[r, g, b]``
per label (the pack draws ADE20K's palette); without it each label gets a colour from its index's
bits (the PASCAL VOC colour map).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.described_file import Architecture, load_described, save_described
from diffsplit.engine.models.ldm_keys import open_tensor_file
from diffsplit.engine.models.uniformer import is_uniformer, load_uniformer

UPERNET = "upernet"
PALETTE_KEY = "palette"
#: where an mmsegmentation checkpoint's ``meta`` keeps its dataset's colours
CHECKPOINT_PALETTE_KEY = "PALETTE"
_CACHED_MODELS = 2


@dataclass(frozen=True, eq=False)
class SegmentationModel:
    """A loaded UperNet, the colour of each of its labels (``[labels, 3]`` in [0, 1]), the multiple
    its input sides must have (its backbone's total stride), and whether it is fed as the pack's
    mmsegmentation pipeline feeds it (``pack_pipeline``: the image rescaled to fit 2048 x 512 keeping
    its ratio, whatever the resolution, and its RGB channels swapped to BGR before normalising)."""

    network: torch.nn.Module
    palette: torch.Tensor
    stride: int
    pack_pipeline: bool = False

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """Label scores ``[B, labels, H, W]`` for normalised ``pixels`` ``[B, 3, H, W]``."""
        output = self.network(pixel_values=pixels)
        return output if isinstance(output, torch.Tensor) else output.logits


def segmentation_network(config: dict[str, Any]) -> torch.nn.Module:
    """An untrained UperNet of ``config`` (in eval mode)."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    return UperNetForSemanticSegmentation(UperNetConfig.from_dict(config)).eval()


ARCHITECTURE = Architecture(name=UPERNET, label="UperNet", model_type="upernet", backbone_types=("convnext",),
                            build=segmentation_network)


def tiny_segmentation_config(labels: int = 12) -> dict[str, Any]:
    """A tiny UperNet config: a four-stage ConvNeXt backbone and the full head, few channels."""
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=labels,
                         use_auxiliary_head=False, pool_scales=[1, 2, 3, 6]).to_dict()


def bit_palette(labels: int) -> torch.Tensor:
    """The PASCAL VOC colour map: label ``i``'s bits spread over red, green and blue, high bits first."""
    colours = torch.zeros(labels, 3)
    for label in range(labels):
        value, rgb = label, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours[label] = torch.tensor(rgb, dtype=torch.float32) / 255
    return colours


def _palette(metadata: dict[str, str], labels: int, name: str) -> torch.Tensor:
    text = metadata.get(PALETTE_KEY, metadata.get(CHECKPOINT_PALETTE_KEY))
    if text is None:
        return bit_palette(labels)
    try:
        palette = torch.tensor(json.loads(text), dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError):
        raise ModelFileError(f"{name}: its palette is not a JSON list of [r, g, b] lists") from None
    if palette.shape != (labels, 3) or not bool(((palette >= 0) & (palette <= 255)).all()):
        raise ModelFileError(f"{name}: its palette must hold {labels} colours of 3 values in 0..255, "
                             f"not {tuple(palette.shape)}")
    return palette / 255


def save_segmentation_model(path: Path, network: torch.nn.Module, palette: list[list[int]] | None = None
                            ) -> Path:
    """Write ``network`` (an UperNetForSemanticSegmentation) and its labels' colours as a
    self-describing safetensors file; returns ``path``."""
    extra = {PALETTE_KEY: json.dumps(palette)} if palette is not None else None
    return save_described(path, network, ARCHITECTURE, extra)


def load_segmentation_model(path: Path) -> SegmentationModel:
    """The UperNet of ``path`` (cached while the file is unchanged); ModelFileError names what is wrong
    with a file that is not one."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int) -> SegmentationModel:
    name = Path(path).name
    with open_tensor_file(Path(path)) as source:
        if is_uniformer(source.shapes):
            network = load_uniformer(source, name)
            labels = network.decode_head.classifier.out_channels
            return SegmentationModel(network=network, palette=_palette(dict(source.metadata), labels, name),
                                     stride=32, pack_pipeline=True)
    described = load_described(Path(path), ARCHITECTURE)
    labels = int(described.network.config.num_labels)  # type: ignore[union-attr]
    palette = _palette(dict(described.metadata), labels, Path(path).name)
    return SegmentationModel(network=described.network, palette=palette, stride=32)


def write_tiny_segmentation_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny seeded UperNet file (12 labels, the bit palette written out); returns ``path``."""
    generator = torch.Generator().manual_seed(seed)
    network = segmentation_network(tiny_segmentation_config())
    with torch.no_grad():
        for name, parameter in sorted(network.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:  # He-scaled, so the random labels vary over the image
                parameter.copy_(noise * (2 / parameter[0].numel()) ** 0.5)
            else:
                parameter.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return save_segmentation_model(path, network, tiny_palette())


def tiny_palette(labels: int = 12) -> list[list[int]]:
    """The tiny set's label colours (the bit palette, written out in the files)."""
    return (bit_palette(labels) * 255).round().int().tolist()
