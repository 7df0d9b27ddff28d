"""T2I-Adapter files: diffusers' ``T2IAdapter`` (full adapters) from the keys and shapes of a file.

ComfyUI loads T2I-Adapters through ControlNetLoader, as here (:func:`is_t2i_adapter`
tells them apart from ControlNets by their keys). Two key layouts are read:

- diffusers': ``adapter.conv_in.*``, ``adapter.body.<stage>.in_conv.*``,
  ``adapter.body.<stage>.resnets.<block>.block{1,2}.*``;
- the original TencentARC files': ``conv_in.*``, ``body.<n>.in_conv.*``,
  ``body.<n>.block{1,2}.*`` with ``n = stage * blocks_per_stage + block``.

The config follows from the shapes: one stage per channel width (``block2``'s
output channels), the blocks per stage, and the pixel-unshuffle factor from
``conv_in``'s input channels (3 colour channels times the factor squared). Light
and XL adapters have other layouts and are refused with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.ldm_keys import TensorFile, assemble_module, build_on_meta
from diffusers import T2IAdapter

_DIFFUSERS = re.compile(r"^adapter\.body\.(\d+)\.resnets\.(\d+)\.(block[12])\.(weight|bias)$")
_ORIGINAL = re.compile(r"^body\.(\d+)\.(block[12]|in_conv)\.(weight|bias)$")
_HINT_CHANNELS = 3


def is_t2i_adapter(keys: Mapping[str, object]) -> bool:
    """Whether a weights file holds a T2I-Adapter (either layout) rather than a ControlNet."""
    return "adapter.conv_in.weight" in keys or ("conv_in.weight" in keys and any(
        _ORIGINAL.match(key) for key in keys))


def _diffusers_keys(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """file key → diffusers key."""
    if "adapter.conv_in.weight" in shapes:
        return {key: key for key in shapes}
    blocks_per_stage = _original_blocks_per_stage(shapes)
    renamed: dict[str, str] = {}
    for key in shapes:
        if key.startswith("conv_in."):
            renamed[key] = f"adapter.{key}"
            continue
        match = _ORIGINAL.match(key)
        if match is None:
            raise ModelFileError(f"unexpected T2I-Adapter key {key!r} (only full adapters are read)")
        index, part, kind = int(match[1]), match[2], match[3]
        stage, block = divmod(index, blocks_per_stage)
        if part == "in_conv":
            renamed[key] = f"adapter.body.{stage}.in_conv.{kind}"
        else:
            renamed[key] = f"adapter.body.{stage}.resnets.{block}.{part}.{kind}"
    return renamed


def _original_blocks_per_stage(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Blocks per stage in the original layout: the distance between blocks that change the width."""
    indices = sorted({int(m[1]) for key in shapes if (m := _ORIGINAL.match(key))})
    widths = [shapes[f"body.{i}.block2.weight"][0] for i in indices]
    changes = [i for i in range(1, len(widths)) if widths[i] != widths[i - 1]]
    return changes[0] if changes else len(widths)


def adapter_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, object]:
    """The ``T2IAdapter`` arguments of a file (diffusers keys), from its shapes."""
    stages: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    for key, shape in shapes.items():
        match = _DIFFUSERS.match(key)
        if match is not None:
            stages.setdefault(int(match[1]), set()).add(int(match[2]))
            if match[3] == "block2" and match[4] == "weight":
                widths[int(match[1])] = shape[0]
    conv_in = shapes.get("adapter.conv_in.weight")
    if not stages or conv_in is None or set(stages) != set(range(len(stages))):
        raise ModelFileError("not a full T2I-Adapter (light and XL adapters are not read)")
    blocks = {len(found) for found in stages.values()}
    factor = math.isqrt(conv_in[1] // _HINT_CHANNELS)
    if len(blocks) != 1 or factor * factor * _HINT_CHANNELS != conv_in[1]:
        raise ModelFileError(f"a T2I-Adapter whose conv_in takes {conv_in[1]} channels or whose stages "
                             "differ in depth is not a full RGB adapter")
    return {"in_channels": _HINT_CHANNELS, "channels": [widths[i] for i in range(len(stages))],
            "num_res_blocks": blocks.pop(), "downscale_factor": factor, "adapter_type": "full_adapter"}


def load_t2i_adapter(source: TensorFile, dtype: torch.dtype) -> T2IAdapter:
    """The adapter of an open weights file (either layout), in ``dtype``."""
    renamed = _diffusers_keys(source.shapes)
    shapes = {renamed[key]: shape for key, shape in source.shapes.items()}
    config = adapter_config(shapes)
    # built on the meta device and given the file's own tensors: a width the shapes claim allocates
    # nothing until the tensors are checked to fit it
    skeleton = build_on_meta(lambda: T2IAdapter(**config))  # type: ignore[arg-type]
    state: dict[str, torch.Tensor] = {}
    for key in source.shapes:
        tensor = source.read(key)
        state[renamed[key]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return assemble_module(skeleton, state, source.path)  # type: ignore[return-value]


def original_layout(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights under the original TencentARC keys (the inverse of the renaming above)."""
    config = adapter.config
    blocks = int(config["num_res_blocks"])
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.state_dict().items():
        match = _DIFFUSERS.match(key)
        if match is not None:
            stage, block, part, kind = int(match[1]), int(match[2]), match[3], match[4]
            tensors[f"body.{stage * blocks + block}.{part}.{kind}"] = tensor
        elif (found := re.match(r"^adapter\.body\.(\d+)\.in_conv\.(weight|bias)$", key)) is not None:
            tensors[f"body.{int(found[1]) * blocks}.in_conv.{found[2]}"] = tensor
        else:
            tensors[key.removeprefix("adapter.")] = tensor
    return {key: value.contiguous() for key, value in tensors.items()}


def tiny_t2i_adapter(channels: tuple[int, ...], seed: int = 0, blocks: int = 2) -> T2IAdapter:
    """A seeded full adapter whose stages match a UNet with ``channels`` per down block."""
    adapter = T2IAdapter(in_channels=_HINT_CHANNELS, channels=list(channels), num_res_blocks=blocks,
                         downscale_factor=8, adapter_type="full_adapter").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(adapter.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return adapter
