"""The files a pipeline component came from, found by its own weights, for an offload with no trace.

``diffsplit.offload(pipe, "unet", to=...)`` with no trace rebuilds the UNet on
the worker as ``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``.
Which files that reads is found here by comparing the module with its
subfolder: its config, and the weight file (or shards) whose every tensor
equals the module's own (converted to the module's dtype, as a load with
``torch_dtype`` converts it). The recipe's folder reference lists just those
files, each by sha256, so a worker holding them in any layout serves it.

The comparison is exact and covers every tensor the file holds, so weights
edited in place after loading (``conv_in.weight.add_(…)``, a merged adapter)
are refused here, before anything is sent, naming the first tensor that
differs. PEFT adapters keep the base weights under ``base_layer``; those are
compared, the adapters themselves travel by content (``untraced_adapters``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffsplit.tracer.files import folder_ref
from diffsplit.tracer.recipe import FileRef

_CONFIG_NAMES = ("config.json",)
_INDEX_SUFFIX = ".safetensors.index.json"
_MAX_INDEX_BYTES = 16 << 20


class WeightsEdited(Exception):
    """The module's weights match no weight file of its folder; the message names what differs."""


def _shards(subfolder: Path) -> list[tuple[Path, ...]]:
    """Each candidate weight set of a subfolder: a single safetensors file, or an index and its shards."""
    candidates: list[tuple[Path, ...]] = []
    for index in sorted(subfolder.glob(f"*{_INDEX_SUFFIX}")):
        try:
            if index.stat().st_size > _MAX_INDEX_BYTES:
                continue
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        shards = [subfolder / name for name in names if isinstance(name, str) and "/" not in name]
        if shards and all(shard.is_file() for shard in shards):
            candidates.append((index, *shards))
    candidates.extend((path,) for path in sorted(subfolder.glob("*.safetensors")) if path.is_file())
    return candidates


def _base_tensor(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The module's tensor for a file key, looking under PEFT's ``base_layer`` too."""
    if key in state:
        return state[key]
    head, _, leaf = key.rpartition(".")
    return state.get(f"{head}.base_layer.{leaf}")


def _difference(files: tuple[Path, ...], state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``files`` do not hold exactly the module's weights (None: they do)."""
    from safetensors import safe_open

    weights = [path for path in files if path.name.endswith(".safetensors")]
    seen = 0
    for path in weights:
        with safe_open(str(path), framework="pt") as stream:
            for key in stream.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                mine = _base_tensor(state, key)
                if mine is None:
                    return f"{path.name} holds {key!r}, which the module lacks"
                stored = stream.get_tensor(key)
                if stored.shape != mine.shape or not torch.equal(stored.to(mine.dtype), mine.detach().cpu()):
                    return f"{key} differs from {path.name}"
                seen += 1
    base_keys = [key for key in state if ".lora_" not in key and "lora_magnitude" not in key]
    if seen != len(base_keys):
        return f"the module holds {len(base_keys)} tensors, {'/'.join(p.name for p in weights)} {seen}"
    return None


def component_folder_ref(folder: Path, component: str, module: torch.nn.Module,
                         sha256: Callable[[Path], str]) -> FileRef:
    """The folder reference of ``folder`` listing the files ``module`` (its ``component``) came from.

    Raises WeightsEdited when no weight file of ``folder/component`` holds exactly the module's weights.
    """
    subfolder = folder / component
    configs = [subfolder / name for name in _CONFIG_NAMES if (subfolder / name).is_file()]
    if not configs:
        raise WeightsEdited(f"{component}/ of {folder.name} holds no config.json")
    state = module.state_dict()
    reasons = []
    for candidate in _shards(subfolder):
        reason = _difference(candidate, state)
        if reason is None:
            return folder_ref(folder, (*configs, *candidate), sha256, None)
        reasons.append(reason)
    raise WeightsEdited(
        f"its weights are not those of any weight file in {folder.name}/{component} "
        f"({'; '.join(reasons) or 'it holds no .safetensors file'}): weights edited in place after loading"
    )
