"""Key rules between the LDM UNet layout and diffusers' ``UNet2DConditionModel``.

LDM numbers its blocks flat: ``input_blocks.0.0`` is ``conv_in``; every down
level then contributes one ``input_blocks.k`` per resnet (``.0`` resnet, ``.1``
attention) plus one for its downsampler (``input_blocks.k.0.op``);
``middle_block.0/1/2`` are resnet, attention, resnet; every up level
contributes one ``output_blocks.k`` per resnet, the last of which also holds
the upsampler (``.1.conv`` without attention, ``.2.conv`` with it). The layout
(how many resnets per level, which levels sample and attend) is read from the
module's own keys, so any ``layers_per_block`` works.

ControlNet reuses :func:`unet_ldm_key` for the parts it shares with the UNet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffsplit.engine.models.ldm_keys import KeyRule

#: Whole-layer renames (module layer → LDM layer), parameter name kept.
TOP_LEVEL_LAYERS: tuple[tuple[str, str], ...] = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)

#: Resnet sub-layer renames (diffusers ResnetBlock2D → LDM ResBlock).
RESNET_LAYERS: tuple[tuple[str, str], ...] = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


@dataclass(frozen=True)
class UnetLayout:
    """How many resnets each level holds and which levels sample or attend."""

    down_resnets: tuple[int, ...]
    down_samplers: tuple[bool, ...]
    up_resnets: tuple[int, ...]
    up_attentions: tuple[bool, ...]

    @classmethod
    def from_module_keys(cls, keys: Iterable[str]) -> UnetLayout:
        """Read the layout from diffusers state-dict keys (UNet or ControlNet)."""
        down_res: dict[int, set[int]] = {}
        down_samplers: set[int] = set()
        up_res: dict[int, set[int]] = {}
        up_attn: set[int] = set()
        for key in keys:
            parts = key.split(".")
            if parts[0] not in ("down_blocks", "up_blocks"):
                continue
            level, kind = int(parts[1]), parts[2]
            if parts[0] == "down_blocks":
                down_res.setdefault(level, set())
                if kind == "resnets":
                    down_res[level].add(int(parts[3]))
                elif kind == "downsamplers":
                    down_samplers.add(level)
            else:
                up_res.setdefault(level, set())
                if kind == "resnets":
                    up_res[level].add(int(parts[3]))
                elif kind == "attentions":
                    up_attn.add(level)
        return cls(
            down_resnets=tuple(len(down_res[level]) for level in sorted(down_res)),
            down_samplers=tuple(level in down_samplers for level in sorted(down_res)),
            up_resnets=tuple(len(up_res[level]) for level in sorted(up_res)),
            up_attentions=tuple(level in up_attn for level in sorted(up_res)),
        )

    def input_block(self, level: int, index: int) -> int:
        """LDM ``input_blocks`` number of resnet ``index`` of down ``level`` (one past the last: sampler)."""
        before = sum(self.down_resnets[i] + self.down_samplers[i] for i in range(level))
        return 1 + before + index

    def output_block(self, level: int, index: int) -> int:
        """LDM ``output_blocks`` number of resnet ``index`` of up level ``level``."""
        return sum(self.up_resnets[:level]) + index


def _rename_layer(layer: str, table: tuple[tuple[str, str], ...], what: str) -> str:
    for module_name, ldm_name in table:
        if layer == module_name:
            return ldm_name
    raise ValueError(f"no LDM name for {what} layer {layer!r}")


def _resnet_key(ldm_block: str, rest: list[str]) -> str:
    layer = _rename_layer(rest[0], RESNET_LAYERS, "resnet")
    return ".".join([ldm_block, layer, *rest[1:]])


def unet_ldm_key(key: str, layout: UnetLayout) -> str:
    """The LDM key (no ``model.diffusion_model.`` prefix) of a diffusers UNet key.

    Raises ValueError for keys outside the SD/SDXL UNet layout.
    """
    layer, _, param = key.rpartition(".")
    for module_name, ldm_name in TOP_LEVEL_LAYERS:
        if layer == module_name:
            return f"{ldm_name}.{param}"
    parts = key.split(".")
    if parts[0] == "down_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "resnets":
            return _resnet_key(f"input_blocks.{layout.input_block(level, int(parts[3]))}.0", parts[4:])
        if kind == "attentions":
            return ".".join([f"input_blocks.{layout.input_block(level, int(parts[3]))}.1", *parts[4:]])
        if kind == "downsamplers" and parts[4] == "conv":
            block = layout.input_block(level, layout.down_resnets[level])
            return ".".join([f"input_blocks.{block}.0.op", *parts[5:]])
    elif parts[0] == "mid_block":
        kind, index = parts[1], int(parts[2])
        if kind == "resnets":
            return _resnet_key(f"middle_block.{2 * index}", parts[3:])
        if kind == "attentions" and index == 0:
            return ".".join(["middle_block.1", *parts[3:]])
    elif parts[0] == "up_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "resnets":
            return _resnet_key(f"output_blocks.{layout.output_block(level, int(parts[3]))}.0", parts[4:])
        if kind == "attentions":
            return ".".join([f"output_blocks.{layout.output_block(level, int(parts[3]))}.1", *parts[4:]])
        if kind == "upsamplers" and parts[4] == "conv":
            block = layout.output_block(level, layout.up_resnets[level] - 1)
            slot = 2 if layout.up_attentions[level] else 1
            return ".".join([f"output_blocks.{block}.{slot}.conv", *parts[5:]])
    raise ValueError(f"no LDM name for UNet weight {key!r}")


def unet_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for every key of a diffusers UNet2DConditionModel state dict."""
    keys = list(module_keys)
    layout = UnetLayout.from_module_keys(keys)
    return tuple(KeyRule(unet_ldm_key(key, layout), (key,)) for key in keys)
