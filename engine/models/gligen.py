"""GLIGEN text-box models in ComfyUI's file layout (``gligen_sd14_textbox_pruned.safetensors``).

A GLIGEN file holds two kinds of weights:

- ``position_net.*``: the grounding-token network. ``null_positive_feature``
  ``[D]`` and ``null_position_feature`` ``[P]`` (``P = 8 * fourier_freqs``:
  sin and cos of x1, y1, x2, y2) stand in for unused box slots;
  ``linears.0/2/4`` (SiLU between) map ``[D + P]`` to the object tokens
  ``[K]``.
- one gated self-attention block ("fuser") per UNet transformer block, under
  that block's LDM name:
  ``input_blocks.1.1.transformer_blocks.0.fuser.{linear, attn.to_q, attn.to_k,
  attn.to_v, attn.to_out.0, ff.net.0.proj, ff.net.2, norm1, norm2}.*`` and the
  scalar gates ``fuser.alpha_attn`` / ``fuser.alpha_dense`` (any prefix before
  the block name is accepted, as ComfyUI matches these keys by substring).

The fuser's math is ComfyUI's ``GatedSelfAttentionDense``::

    objs = linear(objs)
    x = x + tanh(alpha_attn) * attn(norm1(cat([x, objs])))[:, :len(x)]
    x = x + tanh(alpha_dense) * ff(norm2(x))        # ff: GEGLU, 4x wide

Its attention uses the head count of the transformer block it is fused into
(given at call time): for real files that is ComfyUI's rule (8 heads for
SD 1.x, 64-channel heads otherwise). Sizes are read from the weights' shapes;
a file whose shapes do not fit together is refused naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import assemble_module, build_on_meta, open_tensor_file
from diffsplit.engine.models.ldm_unet import UnetLayout, unet_ldm_key
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

POSITION_PREFIX = "position_net."
#: ComfyUI's cap on boxes per conditioning entry (the position net always sees this many slots).
MAX_OBJECTS = 30
#: Box coordinates per slot (x1, y1, x2, y2), each as a sin and a cos per frequency.
_BOX_VALUES = 4
_FOURIER_TEMPERATURE = 100
_FUSER_KEY = re.compile(
    r"(?P<block>(?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)"
    r"\.transformer_blocks\.(?P<index>\d+)\.fuser\.(?P<param>.+)$"
)
_BLOCK_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}
_FUSER_PARAMS = frozenset(
    {
        "alpha_attn", "alpha_dense", "linear.weight", "linear.bias", "attn.to_q.weight", "attn.to_k.weight",
        "attn.to_v.weight", "attn.to_out.0.weight", "attn.to_out.0.bias", "ff.net.0.proj.weight",
        "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias",
        "norm2.weight", "norm2.bias",
    }
)
_POSITION_PARAMS = frozenset(
    {
        "null_positive_feature", "null_position_feature", "linears.0.weight", "linears.0.bias",
        "linears.2.weight", "linears.2.bias", "linears.4.weight", "linears.4.bias",
    }
)


class _Attention(nn.Module):
    """Multi-head self-attention without biases on q/k/v (ComfyUI's CrossAttention, keys to_q... to_out.0)."""

    def __init__(self, query_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, tokens, -1))


class _Geglu(nn.Module):
    """``a * gelu(b)`` of the two halves of one projection (key ``proj``)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.functional.gelu(gate)


class _FeedForward(nn.Module):
    """GEGLU then a projection back (keys ``net.0.proj``, ``net.2``; ``net.1`` is a weightless dropout)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_Geglu(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class GatedSelfAttention(nn.Module):
    """GLIGEN's fuser: visual tokens attend over themselves and the object tokens, through tanh gates."""

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, ff_inner_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = _Attention(query_dim, inner_dim)
        self.ff = _FeedForward(query_dim, ff_inner_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    @property
    def query_dim(self) -> int:
        """Channels of the visual tokens this fuser takes."""
        return int(self.linear.out_features)

    @property
    def inner_dim(self) -> int:
        """Channels of the attention (heads x head width)."""
        return int(self.attn.to_q.out_features)

    def forward(self, x: torch.Tensor, objs: torch.Tensor, heads: int) -> torch.Tensor:
        """``x`` ``[B, N, C]`` with the object tokens ``objs`` ``[B, M, K]`` fused in."""
        visual = x.shape[1]
        objs = self.linear(objs)
        attended = self.attn(self.norm1(torch.cat([x, objs], dim=1)), heads)[:, :visual, :]
        x = x + torch.tanh(self.alpha_attn) * attended
        return x + torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


class PositionNet(nn.Module):
    """Boxes and their text embeddings → object tokens (padding slots take the learned null features)."""

    def __init__(self, in_dim: int, position_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linears = nn.Sequential(
            nn.Linear(in_dim + position_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.null_positive_feature = nn.Parameter(torch.zeros(in_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    @property
    def in_dim(self) -> int:
        """Width of a box's text embedding (the CLIP's pooled output)."""
        return int(self.null_positive_feature.shape[0])

    @property
    def out_dim(self) -> int:
        """Width of an object token."""
        return int(self.linears[4].out_features)

    def fourier(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[B, N, 4]`` → ``[B, N, 8 * freqs]``: per frequency, sin then cos of the four coordinates."""
        freqs = self.null_position_feature.shape[0] // (2 * _BOX_VALUES)
        bands = _FOURIER_TEMPERATURE ** (torch.arange(freqs) / freqs)
        angles = boxes.unsqueeze(-2) * bands.to(device=boxes.device, dtype=boxes.dtype).reshape(-1, 1)
        waves = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-2)
        return waves.reshape(*boxes.shape[:-1], -1)

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Object tokens ``[B, N, K]``.

        ``boxes`` ``[B, N, 4]`` (0-1), ``masks`` ``[B, N]``, ``embeddings`` ``[B, N, D]``; slots whose
        mask is 0 take the null features.
        """
        masks = masks.unsqueeze(-1)
        position = self.fourier(boxes)
        null_text = self.null_positive_feature.to(boxes).reshape(1, 1, -1)
        null_position = self.null_position_feature.to(boxes).reshape(1, 1, -1)
        embeddings = embeddings * masks + (1 - masks) * null_text
        position = position * masks + (1 - masks) * null_position
        return self.linears(torch.cat([embeddings, position], dim=-1))


class GligenModel(nn.Module):
    """ComfyUI ``GLIGEN``: the position net and one fuser per UNet transformer block (by LDM name).

    ``block_names[i]`` (``input_blocks.1.1.transformer_blocks.0``...) is where
    ``fusers[i]`` goes, in ComfyUI's order (input, middle, output blocks).
    ``source`` names the file, for messages.
    """

    def __init__(
        self, position_net: PositionNet, fusers: Sequence[GatedSelfAttention], block_names: Sequence[str],
        source: str = "",
    ) -> None:
        super().__init__()
        if len(fusers) != len(block_names):
            raise ValueError("one block name per fuser")
        self.position_net = position_net
        self.fusers = nn.ModuleList(fusers)
        self.block_names = tuple(block_names)
        self.source = source

    def fuser_for(self, block_name: str) -> GatedSelfAttention | None:
        """The fuser of the transformer block with LDM name ``block_name``, or None."""
        if block_name not in self.block_names:
            return None
        return self.fusers[self.block_names.index(block_name)]  # type: ignore[return-value]


def transformer_blocks(unet: nn.Module) -> dict[str, tuple[str, BasicTransformerBlock]]:
    """``{ldm_name: (module_path, block)}`` for every transformer block of a diffusers UNet, in LDM order."""
    layout = UnetLayout.from_module_keys(unet.state_dict().keys())
    found = {}
    for path, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            name = unet_ldm_key(f"{path}.norm1.weight", layout).removesuffix(".norm1.weight")
            found[name] = (path, module)
    return {name: found[name] for name in sorted(found, key=_block_sort_key)}


def _block_sort_key(block_name: str) -> tuple[int, ...]:
    parts = block_name.split(".")
    return (_BLOCK_ORDER[parts[0]], *(int(part) for part in parts[1:] if part.isdigit()))


def fuser_keys(keys: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{block_name: {param: file_key}}`` for every fuser key, blocks in ComfyUI's order."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _FUSER_KEY.search(key)
        if match is None:
            continue
        block = f"{match['block']}.transformer_blocks.{match['index']}"
        found.setdefault(block, {})[match["param"]] = key
    return {block: found[block] for block in sorted(found, key=_block_sort_key)}


def _dim(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int, path: Path) -> int:
    shape = shapes[key]
    if len(shape) <= axis:
        raise ModelFileError(f"{path}: {key!r} has the shape {list(shape)}, not a GLIGEN weight")
    return int(shape[axis])


def _check_params(path: Path, found: set[str], wanted: frozenset[str], where: str) -> None:
    missing = sorted(wanted - found)
    if missing:
        raise ModelFileError(f"{path}: the GLIGEN {where} lacks {', '.join(missing[:5])}")
    unknown = sorted(found - wanted)
    if unknown:
        raise ModelFileError(f"{path}: the GLIGEN {where} has unknown weights {', '.join(unknown[:5])}")


def load_gligen(path: Path, *, dtype: torch.dtype = torch.float32) -> GligenModel:
    """Read a GLIGEN file (ComfyUI's layout); ModelFileError when it is not one or does not fit together."""
    path = Path(path)
    with open_tensor_file(path) as source:
        keys = list(source.shapes)
        position = {key[len(POSITION_PREFIX):]: key for key in keys if key.startswith(POSITION_PREFIX)}
        fusers = fuser_keys(keys)
        if "null_positive_feature" not in position or not fusers:
            raise ModelFileError(
                f"{path}: not a GLIGEN file (it needs 'position_net.null_positive_feature' and "
                "'...transformer_blocks.N.fuser.*' weights)"
            )
        _check_params(path, set(position), _POSITION_PARAMS, "position net")
        shapes = source.shapes
        in_dim = _dim(shapes, position["null_positive_feature"], 0, path)
        position_dim = _dim(shapes, position["null_position_feature"], 0, path)
        if position_dim % (2 * _BOX_VALUES):
            raise ModelFileError(f"{path}: position_net.null_position_feature must be a multiple of 8 wide")
        hidden_dim = _dim(shapes, position["linears.0.weight"], 0, path)
        out_dim = _dim(shapes, position["linears.4.weight"], 0, path)
        position_net = build_on_meta(lambda: PositionNet(in_dim, position_dim, hidden_dim, out_dim))
        state = {f"position_net.{name}": key for name, key in position.items()}
        modules = []
        for index, (block, params) in enumerate(fusers.items()):
            _check_params(path, set(params), _FUSER_PARAMS, f"fuser of {block}")
            query_dim = _dim(shapes, params["linear.weight"], 0, path)
            context_dim = _dim(shapes, params["linear.weight"], 1, path)
            if context_dim != out_dim:
                raise ModelFileError(
                    f"{path}: {params['linear.weight']!r} takes {context_dim}-wide object tokens, "
                    f"the position net makes {out_dim}-wide ones"
                )
            inner_dim = _dim(shapes, params["attn.to_q.weight"], 0, path)
            ff_inner_dim = _dim(shapes, params["ff.net.2.weight"], 1, path)
            modules.append(
                build_on_meta(lambda q=query_dim, i=inner_dim, f=ff_inner_dim: GatedSelfAttention(
                    q, out_dim, i, f))
            )
            state.update({f"fusers.{index}.{name}": key for name, key in params.items()})
        tensors = {}
        for name, key in state.items():
            tensor = source.read(key)
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model = GligenModel(position_net, modules, tuple(fusers), source=path.name)
    return assemble_module(model, tensors, path)  # type: ignore[return-value]


def gligen_tensors(model: GligenModel) -> dict[str, torch.Tensor]:
    """The model's weights under the file keys :func:`load_gligen` reads."""
    tensors = {
        f"{POSITION_PREFIX}{name}": tensor.detach().contiguous()
        for name, tensor in model.position_net.state_dict().items()
    }
    for block, fuser in zip(model.block_names, model.fusers, strict=True):
        for name, tensor in fuser.state_dict().items():
            tensors[f"{block}.fuser.{name}"] = tensor.detach().contiguous()
    return tensors


def save_gligen(path: Path, model: GligenModel) -> None:
    """Write ``model`` in ComfyUI's GLIGEN layout (byte-reproducible)."""
    save_file_sorted(gligen_tensors(model), Path(path))
