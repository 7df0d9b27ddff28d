"""The common preprocessor pack's segmentation network: UperNet on a UniFormer backbone, read from the
pack's mmsegmentation checkpoint (``upernet_global_small.pth``, through ``torch.load(weights_only=True)``)
or from a safetensors file with the same keys.

UniFormer (Li et al., 2022) has four stages, each opened by a patch embedding (a strided convolution
and a layer norm; stride 4, then 2, 2, 2). The first two stages are convolution blocks (a depthwise
3x3 position embedding, batch norm, a 1x1 / depthwise 5x5 / 1x1 "local relation" and a 1x1
feed-forward); the last two are self-attention blocks over all positions (the pack's "global"
variant); each stage's output is layer-normed and handed to the head. The head is mmsegmentation's
UPerHead, which transformers' ``UperNetHead`` reproduces (pyramid pooling at 1, 2, 3 and 6, a
feature pyramid, one classifier); the file's ``bn``/``conv_seg`` keys are its
``batch_norm``/``classifier``. The auxiliary head (training only) is not read.

Everything is taken from the file's tensor shapes (widths, depth of each stage, feed-forward width,
query-key-value bias, head width, label count), so a network is never larger than its file; the
number of attention heads is not in the weights: the pack's 64-wide heads, unless a safetensors file
says ``head_dim`` in its metadata. The label colours come from the checkpoint's own ``PALETTE``
(mmsegmentation writes its dataset's; the pack draws ADE20K's), or a ``palette`` entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import TensorFile, build_on_meta, check_fit
from diffsplit.engine.models.safetensors_io import save_file_sorted
from torch import nn

#: the pack's attention head width (its config's ``head_dim``)
DEFAULT_HEAD_DIM = 64
HEAD_DIM_KEY = "head_dim"
#: the pyramid pooling scales of the pack's UPerHead
POOL_SCALES = (1, 2, 3, 6)
STAGES = 4
#: bounds on what a file's shapes may ask for
MAX_WIDTH = 4096
MAX_BLOCKS = 64
MAX_HIDDEN_RATIO = 8
MAX_HEAD_CHANNELS = 2048
MAX_LABELS = 1024
#: the largest input the global attention of stages 3 and 4 is run on (its time grows with the
#: square of the pixels): 2048 x 2048, 16384 tokens at stage 3
MAX_PIXELS = 2048 * 2048
_PATCH_STRIDES = (4, 2, 2, 2)
_PREFIX = re.compile(r"^(module\.)?")
_BLOCK = re.compile(r"^backbone\.blocks(\d)\.(\d+)\.")
_POOL = re.compile(r"^decode_head\.psp_modules\.(\d+)\.")
_HEAD_RENAMES = ((".bn.", ".batch_norm."), ("decode_head.conv_seg.", "decode_head.classifier."))


@dataclass(frozen=True)
class UniFormerShape:
    """What a UniFormer-UperNet file's tensors say of its network."""

    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    hidden_ratio: float
    qkv_bias: bool
    head_dim: int
    head_channels: int
    labels: int


class _PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvolutionBlock(nn.Module):
    """A stage 1-2 block: local relation by convolutions, with batch norms."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 1)
        self.attn = nn.Conv2d(width, width, 5, padding=2, groups=width)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.norm2 = nn.BatchNorm2d(width)
        self.mlp = nn.ModuleDict({"fc1": nn.Conv2d(width, hidden, 1), "fc2": nn.Conv2d(hidden, width, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d)) v without holding the tokens x tokens weights at once
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class _AttentionBlock(nn.Module):
    """A stage 3-4 block: self-attention over every position, with layer norms."""

    def __init__(self, width: int, hidden: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _Attention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        batch, width, height, columns = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(tokens))))
        return tokens.transpose(1, 2).reshape(batch, width, height, columns)


class UniFormerBackbone(nn.Module):
    """The four UniFormer stages; ``forward`` returns each stage's normed output."""

    def __init__(self, shape: UniFormerShape) -> None:
        super().__init__()
        previous = 3
        for stage, (width, count, stride) in enumerate(zip(shape.widths, shape.blocks, _PATCH_STRIDES,
                                                           strict=True), start=1):
            hidden = round(width * shape.hidden_ratio)
            self.add_module(f"patch_embed{stage}", _PatchEmbedding(previous, width, stride))
            if stage <= 2:
                blocks = [_ConvolutionBlock(width, hidden) for _ in range(count)]
            else:
                heads = width // shape.head_dim
                blocks = [_AttentionBlock(width, hidden, heads, shape.qkv_bias) for _ in range(count)]
            self.add_module(f"blocks{stage}", nn.ModuleList(blocks))
            self.add_module(f"norm{stage}", nn.LayerNorm(width, eps=1e-6))
            previous = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for stage in range(1, STAGES + 1):
            x = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"blocks{stage}"):
                x = block(x)
            normed = getattr(self, f"norm{stage}")(x.permute(0, 2, 3, 1))
            outputs.append(normed.permute(0, 3, 1, 2).contiguous())
        return tuple(outputs)


class UniFormerUperNet(nn.Module):
    """UniFormer features into transformers' UperNet head; ``forward`` gives label scores at the input's
    size."""

    def __init__(self, shape: UniFormerShape) -> None:
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead

        self.backbone = UniFormerBackbone(shape)
        head = UperNetConfig(hidden_size=shape.head_channels, num_labels=shape.labels,
                             pool_scales=list(POOL_SCALES), use_auxiliary_head=False,
                             backbone_config={"model_type": "convnext"})
        self.decode_head = UperNetHead(head, in_channels=list(shape.widths))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height * width > MAX_PIXELS:
            raise ValueError(f"a {height}x{width} input is over the {MAX_PIXELS} pixels UniFormer's global "
                             "attention is run on")
        scores = self.decode_head(list(self.backbone(pixel_values)))
        return F.interpolate(scores, size=pixel_values.shape[2:], mode="bilinear", align_corners=False)


def is_uniformer(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a file's keys are those of a UniFormer-UperNet checkpoint."""
    keys = {_PREFIX.sub("", key) for key in shapes}
    return "backbone.patch_embed1.proj.weight" in keys and "decode_head.conv_seg.weight" in keys


def _shape_of(shapes: Mapping[str, tuple[int, ...]], key: str, name: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelFileError(f"{name}: a UniFormer-UperNet file needs {key}, which it does not have")
    return shapes[key]


def uniformer_shape(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], name: str
                    ) -> UniFormerShape:
    """The network a file's (prefix-free) tensor shapes describe; ModelFileError when they describe
    none, or one over the bounds."""
    widths = tuple(_shape_of(shapes, f"backbone.patch_embed{stage}.proj.weight", name)[0]
                   for stage in range(1, STAGES + 1))
    counts = [0] * STAGES
    for key in shapes:
        match = _BLOCK.match(key)
        if match and 1 <= int(match[1]) <= STAGES:
            counts[int(match[1]) - 1] = max(counts[int(match[1]) - 1], int(match[2]) + 1)
    if max(widths) > MAX_WIDTH or max(counts) > MAX_BLOCKS or min(counts) < 1:
        raise ModelFileError(f"{name}: stage widths {list(widths)} and blocks {counts} are not a UniFormer "
                             f"within {MAX_WIDTH} channels and 1..{MAX_BLOCKS} blocks a stage")
    hidden = _shape_of(shapes, "backbone.blocks1.0.mlp.fc1.weight", name)[0]
    try:
        head_dim = int(metadata.get(HEAD_DIM_KEY, DEFAULT_HEAD_DIM))
    except ValueError:
        raise ModelFileError(f"{name}: its {HEAD_DIM_KEY} metadata is not a whole number") from None
    if head_dim < 1 or any(width % head_dim for width in widths[2:]):
        raise ModelFileError(f"{name}: attention widths {list(widths[2:])} do not split into heads of "
                             f"{head_dim} (set {HEAD_DIM_KEY!r} in a safetensors file's metadata)")
    classifier = _shape_of(shapes, "decode_head.conv_seg.weight", name)
    pools = {int(match[1]) for key in shapes if (match := _POOL.match(key))}
    if any(key.startswith("decode_head.psp_modules.") and not _POOL.match(key) for key in shapes):
        raise ModelFileError(f"{name}: its head has pyramid-pooling keys that are not numbered")
    if pools != set(range(len(POOL_SCALES))):
        raise ModelFileError(f"{name}: its head pools at {len(pools)} scales; UPerHead's are "
                             f"{list(POOL_SCALES)}")
    if len(classifier) != 4 or not (hidden <= MAX_HIDDEN_RATIO * widths[0]
                                    and classifier[1] <= MAX_HEAD_CHANNELS and classifier[0] <= MAX_LABELS):
        raise ModelFileError(f"{name}: a feed-forward width of {hidden}, a head of {classifier[1:2]} "
                             f"channels and {classifier[0]} labels are over the limits ({MAX_HIDDEN_RATIO}x "
                             f"the stage's width, {MAX_HEAD_CHANNELS}, {MAX_LABELS})")
    return UniFormerShape(widths=widths, blocks=tuple(counts), hidden_ratio=hidden / widths[0],
                          qkv_bias="backbone.blocks3.0.attn.qkv.bias" in shapes, head_dim=head_dim,
                          head_channels=classifier[1], labels=classifier[0])


def _network_key(key: str) -> str:
    for old, new in _HEAD_RENAMES:
        key = key.replace(old, new)
    return key


def file_key(network_key: str) -> str:
    """The checkpoint key of one of :class:`UniFormerUperNet`'s state-dict keys."""
    for old, new in _HEAD_RENAMES:
        network_key = network_key.replace(new, old)
    return network_key


def load_uniformer(source: TensorFile, name: str) -> UniFormerUperNet:
    """The network of a UniFormer-UperNet file (in eval mode, float32)."""
    keys = {_PREFIX.sub("", key): key for key in source.shapes if not _PREFIX.sub("", key).startswith(
        "auxiliary_head.")}
    shapes = {short: source.shapes[key] for short, key in keys.items()}
    shape = uniformer_shape(shapes, source.metadata, name)
    skeleton = build_on_meta(lambda: UniFormerUperNet(shape))
    check_fit(skeleton, {_network_key(key): value for key, value in shapes.items()},
              f"{name}: its weights do not fit a UniFormer-UperNet of {shape}")
    network = UniFormerUperNet(shape).eval()
    state = {_network_key(short): source.read(key) for short, key in keys.items()}
    network.load_state_dict({key: value.float() if value.is_floating_point() else value
                             for key, value in state.items()}, strict=True)
    return network


#: the tiny set's UniFormer-UperNet: the pack's layout with few channels and blocks
TINY_SHAPE = UniFormerShape(widths=(8, 16, 32, 64), blocks=(1, 1, 2, 1), hidden_ratio=4.0, qkv_bias=True,
                            head_dim=16, head_channels=16, labels=12)


def tiny_uniformer_state(seed: int = 0, shape: UniFormerShape = TINY_SHAPE) -> dict[str, torch.Tensor]:
    """A seeded UniFormer-UperNet's tensors under the checkpoint's keys (He-scaled weights, so the
    random labels vary over an image; batch-norm statistics near 0 and 1)."""
    network = UniFormerUperNet(shape)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(network.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=generator)
        if not tensor.is_floating_point():
            value = tensor.clone()
        elif key.endswith("running_var"):
            value = 1.0 + noise.abs() * 0.1
        elif tensor.dim() > 1:
            value = noise * (2 / tensor[0].numel()) ** 0.5
        else:
            value = noise * 0.1 + (1.0 if key.endswith("weight") else 0.0)
        state[file_key(key)] = value.contiguous()
    return state


def write_tiny_uniformer(path: Path, seed: int = 0, palette: list[list[int]] | None = None) -> Path:
    """Write the tiny UniFormer-UperNet as a safetensors file with the pack's keys, its head width and
    palette in the metadata; returns ``path``."""
    metadata = {HEAD_DIM_KEY: str(TINY_SHAPE.head_dim)}
    if palette is not None:
        metadata["palette"] = json.dumps(palette)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_sorted(tiny_uniformer_state(seed), path, metadata=metadata)
    return path
