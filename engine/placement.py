"""A node's inputs with their models on the device, and its outputs back on the CPU.

:func:`place_inputs` swaps each model module inside a node's inputs (a MODEL's
UNet, a CLIP's encoders, a VAE, a ControlNet inside a conditioning's hint, a
GLIGEN model, an upscale model) for its copy from a :class:`DeviceMemory`,
with the dtype of its kind. Tensors are not moved: the nodes move what they
compute on to their model's device and return what they produce on the CPU
(ComfyUI's intermediate device), and :func:`outputs_to_host` makes sure of it,
keeping each tensor's dtype. A model a node returns is given back as its
master, so a worker can still name it by its recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsplit.engine.device_memory import DeviceMemory
from diffsplit.engine.dtypes import ModelKind
from diffsplit.engine.types import ClipVision, ControlNet, DiffusionModel, TextEncoders, UpscaleModel, Vae
from diffsplit.engine.value_walk import DESCEND, map_value

#: The kind of each model field of the engine's model types.
_FIELD_KINDS: dict[tuple[type, str], ModelKind] = {
    (DiffusionModel, "unet"): "unet",
    (DiffusionModel, "genie_head"): "unet",
    (TextEncoders, "encoders"): "text_encoder",
    (Vae, "model"): "vae",
    (ControlNet, "model"): "controlnet",
    (ClipVision, "model"): "text_encoder",
    (UpscaleModel, "model"): "other",
}
#: Kinds of bare modules met in values (a GLIGEN model inside a conditioning), by class name.
_CLASS_KINDS: dict[str, ModelKind] = {
    "UNet2DConditionModel": "unet", "GligenModel": "unet", "GenieHead": "unet",
    "AutoencoderKL": "vae", "ControlNetModel": "controlnet",
    "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder",
    "CLIPVisionModelWithProjection": "text_encoder",
}


def module_kind(module: torch.nn.Module) -> ModelKind:
    """The kind of a bare module, by its class (``other`` when unknown)."""
    return _CLASS_KINDS.get(type(module).__name__, "other")


@dataclass
class Placement:
    """What :func:`place_inputs` swapped: placed object id → the original, to give originals back."""

    originals: dict[int, Any] = field(default_factory=dict)
    #: the placed objects themselves, so their ids stay theirs while this placement lives
    _keep: list[Any] = field(default_factory=list)

    def remember(self, placed: Any, original: Any) -> None:
        if placed is not original:
            self.originals[id(placed)] = original
            self._keep.append(placed)


def place_inputs(inputs: Mapping[str, Any], memory: DeviceMemory) -> tuple[dict[str, Any], Placement]:
    """``inputs`` with every model module on ``memory``'s device, and the record to undo it."""
    placement = Placement()
    memo: dict[int, Any] = {}

    def leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, torch.nn.Module):
            placed = memory.place(value, module_kind(value))
            placement.remember(placed, value)
            return placed
        kinds = _kinds_of(value)
        if kinds is None:
            return DESCEND
        changes = {}
        for name, kind in kinds.items():
            part = getattr(value, name)
            if isinstance(part, torch.nn.Module):
                changes[name] = memory.place(part, kind)
            elif isinstance(part, tuple):
                changes[name] = tuple(memory.place(item, kind) for item in part)
            else:
                continue
            placement.remember(changes[name], part)
        changed = {name: new for name, new in changes.items() if new is not getattr(value, name)}
        if not changed:
            return value
        placed_value = _replace(value, changed)
        placement.remember(placed_value, value)
        return placed_value

    placed = {name: map_value(value, leaf, memo, into_dataclasses=True) for name, value in inputs.items()}
    return placed, placement


def outputs_to_host(outputs: Any, placement: Placement | None = None) -> Any:
    """``outputs`` with every tensor on the CPU (dtype kept) and every placed object its original."""
    originals = placement.originals if placement is not None else {}

    def leaf(value: Any) -> Any:
        if id(value) in originals:
            return originals[id(value)]
        if isinstance(value, torch.Tensor):
            return value if value.device.type == "cpu" else value.cpu()
        if isinstance(value, torch.nn.Module):
            return value
        return DESCEND

    return map_value(outputs, leaf, {}, into_dataclasses=True)


def tensors_to(device: torch.device, value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists, tuples and dataclasses on ``device`` (dtype kept)."""

    def leaf(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item.to(device)
        return DESCEND

    return map_value(value, leaf, {}, into_dataclasses=True)


def device_modules(
    inputs: Mapping[str, Any], memory: DeviceMemory
) -> list[tuple[torch.nn.Module, torch.dtype]]:
    """The (master, dtype) pairs :func:`place_inputs` would place: what a job's admission counts."""
    found: list[tuple[torch.nn.Module, torch.dtype]] = []
    claimed: set[int] = set()  # modules a model type's field gave a kind: not re-kinded by class when met

    def leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, torch.nn.Module):
            if id(value) not in claimed:
                found.append((value, memory.policy.of(module_kind(value))))
            return value
        kinds = _kinds_of(value)
        if kinds is None:
            return DESCEND
        for name, kind in kinds.items():
            part = getattr(value, name)
            parts = part if isinstance(part, tuple) else (part,)
            dtype = memory.policy.of(kind)
            for item in parts:
                if isinstance(item, torch.nn.Module):
                    found.append((item, dtype))
                    claimed.add(id(item))
        return DESCEND  # a model type may hold more (a hint's ControlNet, a guider's model)

    map_value(dict(inputs), leaf, {}, into_dataclasses=True)
    return found


def _kinds_of(value: Any) -> dict[str, ModelKind] | None:
    kinds = {name: kind for (owner, name), kind in _FIELD_KINDS.items() if type(value) is owner}
    return kinds or None


def _replace(value: Any, changed: Mapping[str, Any]) -> Any:
    return dataclasses.replace(value, **changed)
