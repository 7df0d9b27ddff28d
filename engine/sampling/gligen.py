"""GLIGEN at sampling time, the way ComfyUI applies its ``middle_patch``.

GLIGENTextBoxApply leaves ``"gligen": ("position", GligenModel, [(pooled,
h, w, y, x), ...])`` on a conditioning entry (box in latent pixels). For every
UNet call of that entry (alone: such entries never share a batch, as in
ComfyUI):

1. the boxes become ComfyUI's 30 slots: ``(x / W, y / H, (x + w) / W,
   (y + h) / H)`` over the entry's latent crop ``H x W``, the pooled text
   embeddings, and a mask of the used slots (``"empty"``: no slot used);
2. the position net turns them into object tokens ``[B, 30, K]``;
3. every transformer block of the UNet runs its fuser on the hidden states
   between self-attention and cross-attention.

The shared MODEL is never changed. :func:`fused_unet` makes a *view* of the
UNet for the run: the modules on the way from the root to each transformer
block are shallow copies (same parameters, same submodules) whose copies hold
the fuser, and diffusers' own GLIGEN path (``cross_attention_kwargs["gligen"]``)
calls it. The original modules, and anyone else using them at the same time,
see nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.errors import EngineError
from diffsplit.engine.models.gligen import MAX_OBJECTS, GatedSelfAttention, GligenModel, transformer_blocks
from diffsplit.engine.types import DiffusionModel
from torch import nn

GLIGEN_KINDS = ("position", "empty")


class GligenMismatch(EngineError):
    """A GLIGEN value does not fit the model it is sampled with, or is not well formed."""


@dataclass(frozen=True)
class GligenBox:
    """One box: the pooled text embedding ``[1, D]`` and the box in latent pixels."""

    embedding: torch.Tensor
    height: int
    width: int
    y: int
    x: int


class _BoundFuser(nn.Module):
    """A fuser with the head count of the block it sits in (diffusers calls ``fuser(x, objs)``)."""

    def __init__(self, fuser: GatedSelfAttention, heads: int) -> None:
        super().__init__()
        self.fuser = fuser
        self.heads = heads

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        weight = self.fuser.linear.weight
        fused = self.fuser(x.to(weight.dtype), objs.to(device=x.device, dtype=weight.dtype), self.heads)
        return fused.to(x.dtype)


class _ObjectTokens(nn.Module):
    """The view's ``position_net``: the object tokens are computed outside, so it passes them through."""

    def forward(self, objs: torch.Tensor) -> torch.Tensor:
        return objs


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A module sharing every attribute with ``module``, but with its own table of submodules."""
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy.__dict__["_modules"] = dict(module._modules)
    return copy


def _view(root: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """``root`` with the modules at ``replacements``' paths swapped, the originals untouched."""
    copies = {"": _shallow_copy(root)}
    for path, replacement in replacements.items():
        *parents, leaf = path.split(".")
        parent_path = ""
        for name in parents:
            child_path = f"{parent_path}.{name}" if parent_path else name
            if child_path not in copies:
                copies[child_path] = _shallow_copy(copies[parent_path]._modules[name])
                copies[parent_path]._modules[name] = copies[child_path]
            parent_path = child_path
        copies[parent_path]._modules[leaf] = replacement
    return copies[""]


def _describe(model: GligenModel) -> str:
    return f"GLIGEN model {model.source!r}" if model.source else "the GLIGEN model"


def fused_unet(unet: nn.Module, gligen: GligenModel) -> nn.Module:
    """A view of ``unet`` whose transformer blocks run ``gligen``'s fusers.

    Raises GligenMismatch when the fusers do not fit the blocks (names, channels, heads).
    """
    blocks = transformer_blocks(unet)
    missing = [name for name in blocks if gligen.fuser_for(name) is None]
    extra = [name for name in gligen.block_names if name not in blocks]
    if missing or extra:
        detail = f"no fuser for {missing[:3]}" if missing else f"fusers for missing blocks {extra[:3]}"
        raise GligenMismatch(
            f"{_describe(gligen)} does not fit this MODEL: it has fusers for {len(gligen.block_names)} "
            f"transformer blocks, the model has {len(blocks)} ({detail})"
        )
    replacements: dict[str, nn.Module] = {"position_net": _ObjectTokens()}
    for name, (path, block) in blocks.items():
        fuser = gligen.fuser_for(name)
        assert fuser is not None
        heads = int(block.attn1.heads)
        width = int(block.norm1.normalized_shape[0])
        if fuser.query_dim != width or fuser.inner_dim % heads:
            raise GligenMismatch(
                f"{_describe(gligen)} does not fit this MODEL: the fuser of {name} is for "
                f"{fuser.query_dim} channels ({fuser.inner_dim} attention channels), the block has "
                f"{width} channels in {heads} heads"
            )
        block_view = _shallow_copy(block)
        block_view._modules["fuser"] = _BoundFuser(fuser, heads)
        replacements[path] = block_view
    return _view(unet, replacements)


@dataclass(frozen=True, eq=False)
class GligenPatch:
    """A conditioning entry's GLIGEN, resolved for one model: the fused UNet view and the boxes."""

    gligen: GligenModel
    unet: nn.Module
    kind: str
    boxes: tuple[GligenBox, ...]

    def object_tokens(self, crop_shape: Sequence[int]) -> torch.Tensor:
        """ComfyUI's ``set_position`` / ``set_empty`` for latents of ``crop_shape`` ``[B, C, H, W]``."""
        batch, _, height, width = crop_shape
        net = self.gligen.position_net
        weight = net.null_positive_feature
        masks = torch.zeros(MAX_OBJECTS)
        boxes = torch.zeros(MAX_OBJECTS, 4)
        embeddings = torch.zeros(MAX_OBJECTS, net.in_dim)
        if self.kind == "position":
            for slot, box in enumerate(self.boxes):
                masks[slot] = 1.0
                right, bottom = box.x + box.width, box.y + box.height
                boxes[slot] = torch.tensor((box.x / width, box.y / height, right / width, bottom / height))
                embeddings[slot] = box.embedding.reshape(-1).float()

        def batched(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(0).repeat(batch, *([1] * t.ndim)).to(device=weight.device, dtype=weight.dtype)

        with torch.no_grad():
            return net(batched(boxes), batched(masks), batched(embeddings))

    def unet_kwargs(self, crop_shape: Sequence[int]) -> dict[str, Any]:
        """The extra keyword arguments of the fused UNet's forward for latents of ``crop_shape``."""
        return {"cross_attention_kwargs": {"gligen": {"objs": self.object_tokens(crop_shape)}}}


def _boxes(params: Any, in_dim: int) -> tuple[GligenBox, ...]:
    if not isinstance(params, list | tuple):
        raise GligenMismatch("a conditioning entry's gligen boxes are not a list")
    if len(params) > MAX_OBJECTS:
        raise GligenMismatch(f"GLIGEN takes at most {MAX_OBJECTS} boxes per entry, got {len(params)}")
    boxes = []
    for index, item in enumerate(params):
        if not isinstance(item, list | tuple) or len(item) != 5 or not isinstance(item[0], torch.Tensor):
            raise GligenMismatch(f"gligen box {index} is not (pooled, height, width, y, x)")
        embedding, *coords = item
        if embedding.numel() != in_dim:
            raise GligenMismatch(
                f"gligen box {index} has a {embedding.numel()}-value text embedding; the GLIGEN model "
                f"takes {in_dim} (a CLIP of another model family?)"
            )
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in coords):
            raise GligenMismatch(f"gligen box {index}: height, width, y and x must be integers")
        boxes.append(GligenBox(embedding, *coords))
    return tuple(boxes)


def gligen_patch(model: DiffusionModel, value: Any) -> GligenPatch | None:
    """A conditioning entry's ``"gligen"`` value resolved for ``model`` (None when it has none)."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise GligenMismatch("a conditioning entry's 'gligen' is not (kind, GLIGEN model, boxes)")
    kind, gligen, params = value
    if kind not in GLIGEN_KINDS:
        raise GligenMismatch(f"unknown gligen kind {kind!r}; expected one of {GLIGEN_KINDS}")
    if not isinstance(gligen, GligenModel):
        raise GligenMismatch(f"a conditioning entry's gligen model is a {type(gligen).__name__}, not GLIGEN")
    boxes = _boxes(params, gligen.position_net.in_dim) if kind == "position" else ()
    return GligenPatch(gligen=gligen, unet=fused_unet(model.unet, gligen), kind=kind, boxes=boxes)
