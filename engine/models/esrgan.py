"""ESRGAN (RRDBNet) upscale networks: key layouts, hyperparameters from weights, and the network.

Reads the weight layouts spandrel's ESRGAN architecture reads (spandrel is the
library ComfyUI's UpscaleModelLoader uses), and runs the same network:

- **old ESRGAN**: ``model.0.*``, ``model.1.sub.N.RDBk.convj.0.*``, ``model.3.*``…
- **new-arch** (BasicSR, Real-ESRGAN): ``conv_first``, ``body.N.rdbk.convj``,
  ``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``
- **BSRGAN / RealSR**: ``conv_first``, ``RRDB_trunk.N.RDBk.convj``, ``trunk_conv``,
  ``upconv1``/``upconv2``, ``HRconv``, ``conv_last``
- **ESRGAN+**: the old layout with a 1x1 ``conv1x1`` in every dense block.

Every layout is renamed to the old one, whose module tree :class:`RRDBNet`
has. From the weights come the input/output channels, filters, block count,
the scale (2 to the number of upsampling convs) and pixel-unshuffle (Real-ESRGAN
x2 and x1 models read ``4 * out`` or ``16 * out`` channels: the image is
pixel-unshuffled first, so the net scale is the upsampling scale divided by the
shuffle factor). The dense blocks grow by 32 channels, as spandrel assumes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Channels each dense-block convolution adds (spandrel's fixed ``gc``).
GROWTH_CHANNELS = 32
#: Negative slope of every LeakyReLU in the network.
LEAKY_SLOPE = 0.2
#: Residual scaling inside dense blocks and RRDBs.
RESIDUAL_SCALE = 0.2

#: Sets of keys that mark each layout (one full set present = that layout).
LAYOUT_MARKERS: tuple[tuple[str, ...], ...] = (
    ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"),
    ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"),
    ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight"),
    ("model.0.weight", "model.1.sub.0.RDB1.conv1x1.weight"),
)
_BLOCK_KEY = re.compile(r"^(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d+)\.(weight|bias)$")
_UPSAMPLE_KEY = re.compile(r"^(?:upconv|conv_up)(\d)\.(weight|bias)$")


def is_esrgan(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether a (canonical) state dict's keys are one of the ESRGAN layouts."""
    present = set(keys)
    return any(all(key in present for key in marker) for marker in LAYOUT_MARKERS)


def _sequence_length(keys: set[str], prefix: str) -> int:
    """1 + the largest ``i`` with a key ``{prefix}.{i}.…`` (0 when there is none)."""
    found = [int(key[len(prefix) + 1 :].split(".", 1)[0]) for key in keys if key.startswith(prefix + ".")]
    return max(found) + 1 if found else 0


def to_old_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under old-ESRGAN key names (the tensors themselves, not copies).

    Old-layout state dicts come back as they are; keys of the newer layouts
    that the network has no place for are dropped, as spandrel drops them.
    """
    if "conv_first.weight" not in state:
        return dict(state)
    blocks = [int(match.group(1)) for key in state if (match := _BLOCK_KEY.match(key))]
    if not blocks:
        return dict(state)
    trunk = f"model.1.sub.{max(blocks) + 1}"
    upsample = [int(match.group(1)) * 3 for key in state if (match := _UPSAMPLE_KEY.match(key))]
    last_upsample = max(upsample, default=0)
    renamed = {
        "conv_first": "model.0",
        "conv_body": trunk,
        "trunk_conv": trunk,
        "conv_hr": f"model.{last_upsample + 2}",
        "HRconv": f"model.{last_upsample + 2}",
        "conv_last": f"model.{last_upsample + 4}",
    }
    old: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if block := _BLOCK_KEY.match(key):
            number, dense, conv, kind = block.groups()
            old[f"model.1.sub.{number}.RDB{dense}.conv{conv}.0.{kind}"] = tensor
        elif up := _UPSAMPLE_KEY.match(key):
            old[f"model.{int(up.group(1)) * 3}.{up.group(2)}"] = tensor
        else:
            name, _, kind = key.rpartition(".")
            if name in renamed and kind in ("weight", "bias"):
                old[f"{renamed[name]}.{kind}"] = tensor
    return old


@dataclass(frozen=True)
class EsrganConfig:
    """Hyperparameters of an RRDBNet, read from its (old-layout) weights.

    ``scale`` is the network's upsampling scale (before pixel-unshuffle is
    taken into account); :attr:`net_scale` is what an image grows by.
    """

    in_channels: int
    out_channels: int
    filters: int
    blocks: int
    scale: int
    plus: bool = False
    shuffle_factor: int | None = None

    @property
    def net_scale(self) -> int:
        """Output size / input size of the whole model."""
        return self.scale // (self.shuffle_factor or 1)

    @property
    def image_channels(self) -> int:
        """Channels of the images the model reads (before pixel-unshuffle)."""
        return self.in_channels // (self.shuffle_factor or 1) ** 2

    @property
    def tags(self) -> tuple[str, ...]:
        """spandrel's descriptor tags: ``ESRGAN+`` first if so, filters, blocks, ``unshuffle`` if so."""
        tags = [f"{self.filters}nf", f"{self.blocks}nb"]
        if self.plus:
            tags.insert(0, "ESRGAN+")
        if self.shuffle_factor:
            tags.append("unshuffle")
        return tuple(tags)


def esrgan_config(old_state: Mapping[str, torch.Tensor]) -> EsrganConfig:
    """The hyperparameters of an old-layout state dict (see :func:`to_old_layout`).

    Raises KeyError when a tensor the network needs is absent.
    """
    keys = set(old_state)
    length = _sequence_length(keys, "model")
    first = old_state["model.0.weight"]
    in_channels = first.shape[1]
    out_channels = old_state[f"model.{length - 1}.weight"].shape[0]
    shuffle = None
    if in_channels in (out_channels * 4, out_channels * 16):
        shuffle = math.isqrt(in_channels // out_channels)
    return EsrganConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        filters=first.shape[0],
        blocks=_sequence_length(keys, "model.1.sub") - 1,
        scale=2 ** ((length - 5) // 3),
        plus=any(".conv1x1." in key for key in keys),
        shuffle_factor=shuffle,
    )


def _conv(in_channels: int, out_channels: int, *, activate: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
    if activate:
        layers.append(nn.LeakyReLU(LEAKY_SLOPE))
    return nn.Sequential(*layers)


class DenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions with a scaled residual (``ResidualDenseBlock_5C``)."""

    def __init__(self, filters: int, growth: int = GROWTH_CHANNELS, plus: bool = False) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(filters, growth, 1, bias=False) if plus else None
        self.conv1 = _conv(filters, growth, activate=True)
        self.conv2 = _conv(filters + growth, growth, activate=True)
        self.conv3 = _conv(filters + 2 * growth, growth, activate=True)
        self.conv4 = _conv(filters + 3 * growth, growth, activate=True)
        self.conv5 = _conv(filters + 4 * growth, filters, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + 0.2 * conv5(x, x1, x2, x3, x4)``."""
        x1 = self.conv1(x)
        x2 = self.conv2(torch.cat((x, x1), 1))
        if self.conv1x1 is not None:
            x2 = x2 + self.conv1x1(x)
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        if self.conv1x1 is not None:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks and a scaled residual."""

    def __init__(self, filters: int, plus: bool = False) -> None:
        super().__init__()
        self.RDB1 = DenseBlock(filters, plus=plus)
        self.RDB2 = DenseBlock(filters, plus=plus)
        self.RDB3 = DenseBlock(filters, plus=plus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + 0.2 * RDB3(RDB2(RDB1(x)))``."""
        return self.RDB3(self.RDB2(self.RDB1(x))) * RESIDUAL_SCALE + x


class Shortcut(nn.Module):
    """``x + sub(x)``."""

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input plus the submodule's output."""
        return x + self.sub(x)


class RRDBNet(nn.Module):
    """The ESRGAN generator in the old layout: ``model`` is one flat Sequential.

    ``model``: first conv, the RRDB trunk with its closing conv (a shortcut),
    per factor 2 a nearest upsample + conv + LeakyReLU, then HR conv,
    LeakyReLU and the last conv. With ``shuffle_factor`` the input is padded
    (reflect) to a multiple of it and pixel-unshuffled first, and the output
    cut to ``net_scale`` times the input size.
    """

    def __init__(self, config: EsrganConfig) -> None:
        super().__init__()
        self.config = config
        filters = config.filters
        trunk = nn.Sequential(
            *(RRDB(filters, plus=config.plus) for _ in range(config.blocks)),
            nn.Conv2d(filters, filters, 3, padding=1),
        )
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, filters, 3, padding=1), Shortcut(trunk)]
        for _ in range(int(math.log2(config.scale))):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(filters, filters, 3, padding=1),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
        layers += [
            nn.Conv2d(filters, filters, 3, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(filters, config.out_channels, 3, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upscale ``x`` ``[B, C, H, W]`` (values in [0, 1]) by ``config.net_scale``."""
        factor = self.config.shuffle_factor
        if not factor:
            return self.model(x)
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % factor, -width % factor
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        out = self.model(nn.functional.pixel_unshuffle(x, factor))
        scale = self.config.net_scale
        return out[:, :, : height * scale, : width * scale]
