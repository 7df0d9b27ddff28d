"""Key rules between the LDM ControlNet layout and diffusers' ``ControlNetModel``.

The ControlNet's UNet half (``conv_in``, time/add embeddings, down blocks and
the middle block) is named as in the UNet (:func:`unet_ldm_key`). Its own
layers:

- ``controlnet_cond_embedding.conv_in``     ↔ ``input_hint_block.0``
- ``controlnet_cond_embedding.blocks.i``    ↔ ``input_hint_block.{2i + 2}``
- ``controlnet_cond_embedding.conv_out``    ↔ ``input_hint_block.{2n + 2}`` (n blocks; 14 for real files)
- ``controlnet_down_blocks.i``              ↔ ``zero_convs.i.0``
- ``controlnet_mid_block``                  ↔ ``middle_block_out.0``

(``input_hint_block`` interleaves SiLU layers, hence the even numbers.) Real
files may carry a ``control_model.`` prefix; :data:`LDM_CONTROLNET_PREFIX`.
"""

from __future__ import annotations

from collections.abc import Iterable

from diffsplit.engine.models.ldm_keys import KeyRule
from diffsplit.engine.models.ldm_unet import UnetLayout, unet_ldm_key

LDM_CONTROLNET_PREFIX = "control_model."
#: A key only LDM-layout ControlNet files have.
LDM_MARKER_KEY = "input_hint_block.0.weight"
#: A key only diffusers-layout ControlNet files have.
DIFFUSERS_MARKER_KEY = "controlnet_cond_embedding.conv_in.weight"


def hint_block_count(module_keys: Iterable[str]) -> int:
    """How many ``controlnet_cond_embedding.blocks`` a ControlNet state dict has."""
    prefix = "controlnet_cond_embedding.blocks."
    return len({key.split(".")[2] for key in module_keys if key.startswith(prefix)})


def controlnet_ldm_key(key: str, layout: UnetLayout, hint_blocks: int) -> str:
    """The LDM key (no ``control_model.`` prefix) of a diffusers ControlNet key.

    Raises ValueError for keys outside the SD/SDXL ControlNet layout.
    """
    parts = key.split(".")
    param = parts[-1]
    if parts[0] == "controlnet_cond_embedding":
        if parts[1] == "conv_in":
            return f"input_hint_block.0.{param}"
        if parts[1] == "blocks":
            return f"input_hint_block.{2 * int(parts[2]) + 2}.{param}"
        if parts[1] == "conv_out":
            return f"input_hint_block.{2 * hint_blocks + 2}.{param}"
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{param}"
    if parts[0] == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return unet_ldm_key(key, layout)


def controlnet_key_rules(module_keys: Iterable[str]) -> tuple[KeyRule, ...]:
    """Rules for every key of a diffusers ControlNetModel state dict."""
    keys = list(module_keys)
    layout = UnetLayout.from_module_keys(keys)
    hint_blocks = hint_block_count(keys)
    return tuple(KeyRule(controlnet_ldm_key(key, layout, hint_blocks), (key,)) for key in keys)
