"""The distilled GENIE head: a small network that predicts the DDIM ODE's curvature at almost no cost.

Input: the denoiser's input (``x`` scaled as the UNet sees it), its output
(``eps``) and the noise level (sinusoidal features of ``log sigma`` through a
small MLP, added to every feature map). A few convolutional residual blocks
predict ``d eps / d sigma``, the total derivative along the trajectory (of
order one at every noise level; the exact one is a JVP of the whole denoiser,
see ``sampling.genie``). The last layer starts at zero, so an untrained head gives
DDIM's steps.

Files are safetensors: the weights, and the config as JSON in the metadata key
``diffsplit.genie_head`` (nothing is unpickled).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from torch import nn

#: The store folder of head files.
GENIE_HEAD_FOLDER = "genie_heads"
_METADATA_KEY = "diffsplit.genie_head"


@dataclass(frozen=True)
class GenieHeadConfig:
    """The head's shape: latent channels, feature width, residual blocks, time features."""

    channels: int = 4
    hidden: int = 32
    blocks: int = 2
    time_features: int = 16
    #: the typical size of the target (set by distillation): the network's output is multiplied by it
    output_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("channels", "hidden", "blocks", "time_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
                raise ValueError(f"GenieHeadConfig.{name} must be an int in [1, 1024], got {value!r}")
        if self.time_features % 2:
            raise ValueError("GenieHeadConfig.time_features must be even")
        if not isinstance(self.output_scale, int | float) or not 0 < self.output_scale < 1e6:
            raise ValueError(f"GenieHeadConfig.output_scale must be in (0, 1e6), got {self.output_scale!r}")


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, width), width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(self.norm(h)))))


class GenieHead(nn.Module):
    """``head(x_in, eps, sigma) -> d eps / d sigma`` (see the module docstring)."""

    def __init__(self, config: GenieHeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or GenieHeadConfig()
        width = self.config.hidden
        self.conv_in = nn.Conv2d(2 * self.config.channels, width, 3, padding=1)
        features = self.config.time_features
        self.time = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(_ResidualBlock(width) for _ in range(self.config.blocks))
        self.conv_out = nn.Conv2d(width, self.config.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def time_features(self, sigma: torch.Tensor, batch: int) -> torch.Tensor:
        """Sinusoidal features of ``log sigma`` (one row per batch item)."""
        half = self.config.time_features // 2
        spacing = -math.log(100.0) / max(1, half - 1)
        frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * spacing)
        angle = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).log() * frequencies * 10.0
        features = torch.cat([angle.sin(), angle.cos()], dim=1)
        return features.expand(batch, -1) if features.shape[0] == 1 else features

    def forward(self, x_in: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        h = self.conv_in(torch.cat([x_in, eps], dim=1).to(dtype))
        h = h + self.time(self.time_features(sigma, x_in.shape[0]).to(h))[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return (self.conv_out(nn.functional.silu(h)) * self.config.output_scale).to(x_in.dtype)


def save_genie_head(head: GenieHead, path: Path) -> Path:
    """Write ``head`` as safetensors with its config in the metadata; returns ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(asdict(head.config))})
    return path


def load_genie_head(path: Path) -> GenieHead:
    """The head saved at ``path`` (ModelFileError naming the file when it is not a GENIE head)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path.name}: not a readable safetensors file ({exc})") from None
    if _METADATA_KEY not in metadata:
        raise ModelFileError(f"{path.name}: not a GENIE head (no {_METADATA_KEY} metadata)")
    try:
        config = GenieHeadConfig(**json.loads(metadata[_METADATA_KEY]))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path.name}: bad GENIE head config: {exc}") from None
    head = GenieHead(config)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path.name}: weights do not fit the head's config: {str(exc)[:300]}") from None
    return head.eval().requires_grad_(False)


def tiny_genie_head(seed: int) -> GenieHead:
    """A small seeded head with a non-zero last layer (tests: its steps differ from DDIM's)."""
    generator = torch.Generator().manual_seed(seed)
    head = GenieHead(GenieHeadConfig(hidden=8, blocks=1, time_features=8))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return head.eval().requires_grad_(False)
