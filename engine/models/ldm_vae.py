"""Key rules between the LDM VAE layout and diffusers' ``AutoencoderKL``.

- ``{encoder,decoder}.conv_norm_out``           ↔ ``*.norm_out`` (``conv_in``/``conv_out`` keep their names)
- ``encoder.down_blocks.i.resnets.j``           ↔ ``encoder.down.i.block.j``
  (inside resnets ``conv_shortcut`` ↔ ``nin_shortcut``)
- ``encoder.down_blocks.i.downsamplers.0.conv`` ↔ ``encoder.down.i.downsample.conv``
- ``decoder.up_blocks.i.resnets.j``             ↔ ``decoder.up.{n-1-i}.block.j`` (LDM counts backwards)
- ``decoder.up_blocks.i.upsamplers.0.conv``     ↔ ``decoder.up.{n-1-i}.upsample.conv``
- ``*.mid_block.resnets.k``                     ↔ ``*.mid.block_{k+1}``
- ``*.mid_block.attentions.0``: ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` ↔
  ``*.mid.attn_1``: ``norm``, ``q``, ``k``, ``v``, ``proj_out``; LDM holds the
  four projections as 1x1 convs ``[C, C, 1, 1]``, diffusers as linears ``[C, C]``.
- ``quant_conv``/``post_quant_conv`` keep their names.

Checkpoints prefix VAE keys with :data:`LDM_VAE_PREFIX`; standalone VAE files
(ComfyUI ``vae/``) carry none.
"""

from __future__ import annotations

from collections.abc import Iterable

from diffsplit.engine.models.ldm_keys import KeyRule, Transform

LDM_VAE_PREFIX = "first_stage_model."
#: A key only LDM-layout VAE files have.
LDM_MARKER_KEY = "encoder.down.0.block.0.conv1.weight"
#: A key only diffusers-layout VAE files have.
DIFFUSERS_MARKER_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"

#: Mid-block attention renames (module layer → LDM layer, whether the weight is a 1x1 conv in LDM).
ATTENTION_LAYERS: tuple[tuple[str, str, bool], ...] = (
    ("group_norm", "norm", False),
    ("to_q", "q", True),
    ("to_k", "k", True),
    ("to_v", "v", True),
    ("to_out.0", "proj_out", True),
)
#: Layers whose names differ directly under ``encoder``/``decoder``.
TOP_LEVEL_LAYERS: tuple[tuple[str, str], ...] = (("conv_norm_out", "norm_out"),)


def decoder_level_count(module_keys: Iterable[str]) -> int:
    """How many ``decoder.up_blocks`` an AutoencoderKL state dict has."""
    return len({key.split(".")[2] for key in module_keys if key.startswith("decoder.up_blocks.")})


def _attention_rule(key: str, ldm_block: str, rest: str) -> KeyRule:
    layer, _, param = rest.rpartition(".")
    for module_name, ldm_name, is_conv in ATTENTION_LAYERS:
        if layer == module_name:
            transform = Transform.CONV_1X1 if is_conv and param == "weight" else Transform.SAME
            return KeyRule(f"{ldm_block}.{ldm_name}.{param}", (key,), transform)
    raise ValueError(f"no LDM name for VAE attention weight {key!r}")


def _resnet_key(ldm_block: str, rest: list[str]) -> str:
    layer = "nin_shortcut" if rest[0] == "conv_shortcut" else rest[0]
    return ".".join([ldm_block, layer, *rest[1:]])


def vae_key_rule(key: str, decoder_levels: int) -> KeyRule:
    """The rule for one diffusers AutoencoderKL key. Raises ValueError for unknown keys."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return KeyRule(key, (key,))
    if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
        raise ValueError(f"no LDM name for VAE weight {key!r}")
    side, block = parts[0], parts[1]
    if len(parts) == 3:
        for module_name, ldm_name in TOP_LEVEL_LAYERS:
            if block == module_name:
                return KeyRule(f"{side}.{ldm_name}.{parts[2]}", (key,))
        return KeyRule(key, (key,))
    if block == "mid_block" and parts[2] == "resnets":
        return KeyRule(_resnet_key(f"{side}.mid.block_{int(parts[3]) + 1}", parts[4:]), (key,))
    if block == "mid_block" and parts[2] == "attentions" and parts[3] == "0":
        return _attention_rule(key, f"{side}.mid.attn_1", ".".join(parts[4:]))
    if side == "encoder" and block == "down_blocks":
        level, kind = parts[2], parts[3]
        if kind == "resnets":
            return KeyRule(_resnet_key(f"encoder.down.{level}.block.{parts[4]}", parts[5:]), (key,))
        if kind == "downsamplers" and parts[5] == "conv":
            return KeyRule(".".join([f"encoder.down.{level}.downsample.conv", *parts[6:]]), (key,))
    if side == "decoder" and block == "up_blocks":
        level, kind = decoder_levels - 1 - int(parts[2]), parts[3]
        if kind == "resnets":
            return KeyRule(_resnet_key(f"decoder.up.{level}.block.{parts[4]}", parts[5:]), (key,))
        if kind == "upsamplers" and parts[5] == "conv":
            return KeyRule(".".join([f"decoder.up.{level}.upsample.conv", *parts[6:]]), (key,))
    raise ValueError(f"no LDM name for VAE weight {key!r}")


def vae_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for every key of a diffusers AutoencoderKL state dict."""
    keys = list(module_keys)
    levels = decoder_level_count(keys)
    return tuple(vae_key_rule(key, levels) for key in keys)
