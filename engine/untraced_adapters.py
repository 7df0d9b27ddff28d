"""PEFT adapters loaded outside any trace, explained by their content.

A module offloaded with no trace (``diffsplit.offload(pipe, "unet", to=...)``)
is named by the folder it came from; LoRA adapters loaded into it since
(``pipe.load_lora_weights``, ``unet.load_lora_adapter``, ``unet.add_adapter``)
are not in that folder. Each adapter is written here as diffusers writes one
(``save_lora_adapter``'s layout: peft's state dict of the adapter and its peft
config in the header), reproducibly (sorted header, so the same adapter has the
same sha256 every time), and travels once by content: the recipe names the
file by sha256 and the worker, lacking it, asks for it (``MissingModel``); the
client then sends it into the worker's content cache, never its store. The
recipe then loads each adapter with ``load_lora_adapter`` and sets the active
adapters and their weights as they are here.

What cannot be explained this way is refused before anything is sent, naming
the fix: fused adapters (their deltas are in the base weights), per-block
weights, adapter kinds other than LoRA.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.lora_metadata import ADAPTER_METADATA_KEY, config_json
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.tracer.recipe import FileRef, Step

#: The store folder adapter files are named in (the worker keeps them in its content cache).
ADAPTER_FOLDER = "loras"
_FIX = "load it inside `with diffsplit.tracing() as trace:` and pass trace=trace"


class UnexplainedChange(Exception):
    """Adapters on a module that content alone cannot rebuild; the message names why and the fix."""


@dataclass(frozen=True)
class ContentFile:
    """A file a recipe names that the worker may lack: its reference and its bytes."""

    ref: FileRef
    data: bytes


@dataclass(frozen=True)
class AdapterSteps:
    """The recipe steps that put a module's adapters back, and the adapter files they read."""

    steps: tuple[Step, ...]
    files: tuple[ContentFile, ...]


def adapter_steps(module: torch.nn.Module) -> AdapterSteps:
    """Steps (mutators on the module itself) that load ``module``'s PEFT adapters as they are now.

    No adapters: no steps. UnexplainedChange when they cannot be rebuilt from their content.
    """
    configs = getattr(module, "peft_config", None) or {}
    if not configs:
        return AdapterSteps((), ())
    layers = list(_lora_layers(module))
    for name, config in configs.items():
        kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
        if kind != "LORA":
            raise UnexplainedChange(f"adapter {name!r} is a {kind or 'non-LoRA'} adapter; {_FIX}")
    if any(getattr(layer, "merged_adapters", None) for layer in layers):
        raise UnexplainedChange(f"LoRA weights are fused into {type(module).__name__}'s base weights "
                                f"(fuse_lora): a worker cannot separate them; {_FIX}")
    files: list[ContentFile] = []
    steps: list[Step] = []
    for name in configs:
        content = _adapter_file(module, name)
        files.append(content)
        steps.append(Step(op="diffusers.load_lora_adapter", file=content.ref, on="",
                          kwargs={"adapter_name": name, "prefix": None}))
    active = list(module.active_adapters()) if hasattr(module, "active_adapters") else list(configs)
    weights = [_adapter_weight(layers, name, configs[name]) for name in active]
    steps.append(Step(op="diffusers.set_adapters", on="",
                      kwargs={"adapter_names": active, "weights": weights}))
    if layers and all(getattr(layer, "disable_adapters", False) for layer in layers):
        steps.append(Step(op="diffusers.disable_adapters", on=""))
    return AdapterSteps(tuple(steps), tuple(files))


def _lora_layers(module: torch.nn.Module) -> Iterator[Any]:
    from peft.tuners.lora import LoraLayer

    for sub in module.modules():
        if isinstance(sub, LoraLayer):
            yield sub


def _adapter_file(module: torch.nn.Module, name: str) -> ContentFile:
    """Adapter ``name`` as diffusers' ``save_lora_adapter`` lays it out, written reproducibly."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=name)
    config = module.peft_config[name]  # type: ignore[index, union-attr]
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: config_json(config)}
    with tempfile.TemporaryDirectory(prefix="diffsplit-adapter-") as folder:
        path = Path(folder) / "adapter.safetensors"
        save_file_sorted({key: tensor.detach().contiguous() for key, tensor in state.items()}, path, metadata)
        data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    return ContentFile(FileRef(name=f"{sha256}.safetensors", sha256=sha256, bytes=len(data),
                               folder=ADAPTER_FOLDER), data)


def _adapter_weight(layers: list[Any], name: str, config: Any) -> float:
    """The weight ``set_adapters`` gave adapter ``name``: the one giving every layer its scaling exactly."""
    wanted: list[tuple[float, float]] = []  # (default scaling, scaling now) per layer
    for layer in layers:
        scaling = getattr(layer, "scaling", {}).get(name)
        rank = getattr(layer, "r", {}).get(name)
        alpha = getattr(layer, "lora_alpha", {}).get(name)
        if scaling is None or not rank or alpha is None:
            continue
        wanted.append((alpha / (math.sqrt(rank) if getattr(config, "use_rslora", False) else rank),
                       float(scaling)))
    if not wanted:
        return 1.0
    default, scaling = wanted[0]
    weight = scaling / default
    for _ in range(8):  # the quotient may be an ulp off: the product must come out exactly as here
        if default * weight == scaling:
            break
        weight = math.nextafter(weight, math.inf if default * weight < scaling else -math.inf)
    if any(base * weight != now for base, now in wanted):
        raise UnexplainedChange(f"adapter {name!r} has different weights in different blocks; {_FIX}")
    return weight
