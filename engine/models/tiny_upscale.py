"""A tiny, seeded, random-weight ESRGAN upscale model in Real-ESRGAN's file layout.

``write_tiny_esrgan(path, seed)`` writes an RRDBNet shaped like Real-ESRGAN's
``RealESRGAN_x2plus``: new-arch (BasicSR) key names (``conv_first``,
``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
``conv_last``), a 2x pixel-unshuffle in front (12 input channels) and two 2x
upsampling stages, so the model scales images by 2, with 16 filters and two
RRDB blocks instead of 64 and 23. Spandrel (and so ComfyUI) detects such a
file as ESRGAN. Weights are drawn from a generator seeded by ``seed``; the
same seed gives a byte-identical file. The last convolution is biased to
mid-gray with small weights, so outputs stay inside [0, 1] and still depend on
the input everywhere.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from diffsplit.engine.models.esrgan import EsrganConfig, RRDBNet
from diffsplit.engine.models.safetensors_io import save_file_sorted

#: The file's name in ``upscale_models``.
TINY_ESRGAN_FILE = "tiny-esrgan-x2.safetensors"
#: The tiny model's hyperparameters (Real-ESRGAN x2plus's layout, fewer filters and blocks).
TINY_ESRGAN = EsrganConfig(in_channels=12, out_channels=3, filters=16, blocks=2, scale=4, shuffle_factor=2)
_OUTPUT_GAIN = 0.3
_OUTPUT_BIAS = 0.5
_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d+)\.0\.(weight|bias)$")


def new_arch_name(old_key: str, config: EsrganConfig) -> str:
    """The BasicSR (Real-ESRGAN) name of an old-layout RRDBNet key."""
    if block := _BLOCK.match(old_key):
        number, dense, conv, kind = block.groups()
        return f"body.{number}.rdb{dense}.conv{conv}.{kind}"
    layer, _, kind = old_key.rpartition(".")
    upsamplers = {f"model.{3 * (i + 1)}": f"conv_up{i + 1}" for i in range(config.scale.bit_length() - 1)}
    last = 3 * len(upsamplers)
    names = {
        "model.0": "conv_first",
        f"model.1.sub.{config.blocks}": "conv_body",
        f"model.{last + 2}": "conv_hr",
        f"model.{last + 4}": "conv_last",
        **upsamplers,
    }
    if layer not in names:
        raise KeyError(f"no new-arch name for {old_key!r}")
    return f"{names[layer]}.{kind}"


def tiny_esrgan(seed: int = 0, config: EsrganConfig = TINY_ESRGAN) -> RRDBNet:
    """The tiny RRDBNet with seeded weights: ~N(0, 1/fan_in) kernels, small biases, a mid-gray output."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(b"upscale/esrgan"))
    with torch.random.fork_rng(devices=[]):
        network = RRDBNet(config)
    last = network.model[-1]
    with torch.no_grad():
        for param in network.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim < 2:
                param.copy_(0.02 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)
        last.weight.mul_(_OUTPUT_GAIN)
        last.bias.add_(_OUTPUT_BIAS)
    return network.eval()


def write_tiny_esrgan(path: Path, seed: int = 0) -> Path:
    """Write the tiny x2 ESRGAN as a ``.safetensors`` file with Real-ESRGAN key names; returns ``path``."""
    network = tiny_esrgan(seed)
    tensors = {
        new_arch_name(key, network.config): tensor.contiguous()
        for key, tensor in network.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_sorted(tensors, path)
    return path
