"""The line-art network of the common preprocessor pack's LineArtPreprocessor: a ResNet generator
(the "informative drawings" model), read from its own files' keys.

Layout (one ``torch.nn.Sequential`` per stage, indices as in the pack's ``sk_model.pth``):

- ``model0``: reflection pad 3, 7x7 conv to ``width``, instance norm, ReLU;
- ``model1``: two stride-2 3x3 convs (``width`` → 2x → 4x), each with instance norm and ReLU;
- ``model2``: ``blocks`` residual blocks at 4x width (pad, 3x3 conv, norm, ReLU, pad, 3x3 conv, norm);
- ``model3``: two stride-2 3x3 transposed convs back to ``width``, each with norm and ReLU;
- ``model4``: reflection pad 3, 7x7 conv to one channel, sigmoid.

Instance norms carry no weights, so the keys are the convs': ``model0.1``, ``model1.0``,
``model1.3``, ``model2.<i>.conv_block.{1,5}``, ``model3.0``, ``model3.3``, ``model4.1``. The
width and block count follow from the shapes. Files are read as safetensors or, for the
pack's ``.pth``, with ``torch.load(weights_only=True)`` (never an arbitrary pickle).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import build_on_meta, check_fit, open_tensor_file
from diffsplit.engine.models.safetensors_io import save_file_sorted
from torch import nn

_BLOCK_KEY = re.compile(r"^model2\.(\d{1,4})\.conv_block\.")
#: the widest and deepest generator a file may declare (the pack's: width 64, 3 blocks)
MAX_WIDTH = 256
MAX_BLOCKS = 32
_CACHED_MODELS = 2


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convs with instance norms, added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """RGB in [0, 1] → one channel of line art in [0, 1] (dark lines on white)."""

    def __init__(self, width: int = 64, blocks: int = 3) -> None:
        super().__init__()
        self.width, self.blocks = width, blocks
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), nn.InstanceNorm2d(width),
                                    nn.ReLU(True))
        self.model1 = nn.Sequential(
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(width * 2), nn.ReLU(True),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1), nn.InstanceNorm2d(width * 4),
            nn.ReLU(True),
        )
        self.model2 = nn.Sequential(*(ResidualBlock(width * 4) for _ in range(blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(width * 4, width * 2, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(width * 2), nn.ReLU(True),
            nn.ConvTranspose2d(width * 2, width, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(width), nn.ReLU(True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def load_lineart_model(path: Path) -> LineartGenerator:
    """The generator of ``path`` (cached while the file is unchanged); ModelFileError names what is
    wrong with a file that is not one."""
    stat = Path(path).stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_CACHED_MODELS)
def _load(path: str, size: int, mtime_ns: int) -> LineartGenerator:
    with open_tensor_file(Path(path)) as source:
        first = source.shapes.get("model0.1.weight")
        if first is None or len(first) != 4 or first[1:] != (3, 7, 7):
            raise ModelFileError(f"{Path(path).name} is not a line-art generator (no 7x7 RGB model0.1 conv)")
        blocks = len({int(m[1]) for key in source.shapes if (m := _BLOCK_KEY.match(key))})
        name = Path(path).name
        if not 1 <= first[0] <= MAX_WIDTH or blocks > MAX_BLOCKS:
            raise ModelFileError(f"{name}: a line-art generator of width {first[0]} with {blocks} blocks is "
                                 f"over the limits ({MAX_WIDTH}, {MAX_BLOCKS}; the pack's is 64 with 3)")
        skeleton = build_on_meta(lambda: LineartGenerator(width=first[0], blocks=blocks))
        check_fit(skeleton, source.shapes, f"{name}: its weights do not fit a line-art generator of width "
                  f"{first[0]} with {blocks} blocks")
        network = LineartGenerator(width=first[0], blocks=blocks).eval()
        try:
            network.load_state_dict({key: source.read(key) for key in source.shapes}, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"{name}: its weights do not load into a line-art generator: "
                                 f"{str(exc).splitlines()[0]}") from None
    return network


def write_tiny_lineart_model(path: Path, seed: int = 0) -> Path:
    """A seeded generator of width 8 with 2 residual blocks, as a safetensors file; returns ``path``."""
    generator = torch.Generator().manual_seed(seed)
    network = LineartGenerator(width=8, blocks=2)
    with torch.no_grad():
        for _, parameter in sorted(network.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_sorted({key: value.contiguous() for key, value in network.state_dict().items()}, path)
    return path
