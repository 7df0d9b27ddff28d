"""Loading upscale model files (ComfyUI's ``upscale_models`` folder) as :class:`UpscaleModel`.

As ComfyUI's UpscaleModelLoader does: the file is read safely (``.safetensors``,
or ``.pth``/``.pt``/``.ckpt``/``.bin`` through ``torch.load(weights_only=True)``),
the state dict is canonicalized as spandrel does (unwrapped from
``params_ema``/``state_dict``/… containers or a lone key, then a ``module.``
or ``netG.`` prefix every key shares is stripped), and the architecture is
detected from the keys. This engine knows the ESRGAN family
(:mod:`~diffsplit.engine.models.esrgan`); any other file fails with an error
naming the file and what was found in it.

Tensors are copied into allocator-owned float32 memory (as spandrel's models
run in float32), so results never depend on where the file put its bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.esrgan import (
    LAYOUT_MARKERS,
    EsrganConfig,
    RRDBNet,
    esrgan_config,
    is_esrgan,
    to_old_layout,
)
from diffsplit.engine.models.ldm_keys import PICKLE_SUFFIXES, assemble_module, build_on_meta, open_tensor_file
from diffsplit.engine.types import UpscaleModel
from diffsplit.tracer.owned_memory import owned_tensor

#: Container keys a state dict may sit under (spandrel's order).
CONTAINER_KEYS: tuple[str, ...] = (
    "model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net"
)
#: Prefixes stripped when every key has them.
COMMON_PREFIXES: tuple[str, ...] = ("module.", "netG.")
#: Architectures this engine can load.
KNOWN_ARCHITECTURES = "ESRGAN (old ESRGAN, Real-ESRGAN/BasicSR, BSRGAN/RealSR, ESRGAN+)"
_KEYS_SHOWN = 3


def canonical_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict unwrapped and without a shared ``module.``/``netG.`` prefix (spandrel's rules)."""
    for key in CONTAINER_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    if len(state) == 1:
        (only,) = state.values()
        if isinstance(only, Mapping):
            state = only
    result = dict(state)
    for prefix in COMMON_PREFIXES:
        if result and all(isinstance(key, str) and key.startswith(prefix) for key in result):
            result = {key[len(prefix) :]: value for key, value in result.items()}
    return result


def _owned_float(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        return owned_tensor(tensor.to(torch.float32), force=True)
    return owned_tensor(tensor, force=True)


def _read_pickled(path: Path) -> dict[str, Any]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a bad or unsafe file
        raise ModelFileError(f"{path}: not a readable torch weights file ({error})") from error
    if not isinstance(loaded, Mapping):
        raise ModelFileError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    return canonical_state_dict(loaded)


def read_upscale_state(path: Path) -> dict[str, torch.Tensor]:
    """The canonical state dict of an upscale model file, as owned float32 tensors.

    Raises ModelFileError when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = _read_pickled(path)
    else:
        with open_tensor_file(path) as source:
            state = canonical_state_dict({key: source.read(key) for key in source.shapes})
    return {str(key): _owned_float(value) for key, value in state.items() if isinstance(value, torch.Tensor)}


def _not_an_upscale_model(path: Path, keys: list[str]) -> ModelFileError:
    shown = ", ".join(repr(key) for key in sorted(keys)[:_KEYS_SHOWN]) or "no tensors"
    more = f" (of {len(keys)} keys)" if len(keys) > _KEYS_SHOWN else ""
    wanted = " or ".join("+".join(repr(key) for key in marker[:2]) for marker in LAYOUT_MARKERS[:3])
    return ModelFileError(
        f"{path}: not an upscale model this engine can load (known: {KNOWN_ARCHITECTURES}); "
        f"expected keys such as {wanted}, found {shown}{more}"
    )


def build_esrgan(state: Mapping[str, torch.Tensor], path: Path) -> UpscaleModel:
    """An ESRGAN :class:`UpscaleModel` from a canonical state dict (its tensors are taken, not copied)."""
    old = to_old_layout(state)
    try:
        config: EsrganConfig = esrgan_config(old)
    except (KeyError, IndexError) as error:
        raise ModelFileError(f"{path}: an ESRGAN model without the weight {error}") from error
    module = assemble_module(build_on_meta(lambda: RRDBNet(config)), old, path)
    return UpscaleModel(
        model=module,
        architecture="ESRGAN",
        scale=config.net_scale,
        input_channels=config.image_channels,
        output_channels=config.out_channels,
        min_size=2,
        size_multiple=4 if config.shuffle_factor else 1,
        tags=config.tags,
    )


def load_upscale_model(path: Path) -> UpscaleModel:
    """Load an upscale model file; ModelFileError if it is missing, unreadable or of an unknown kind."""
    path = Path(path)
    state = read_upscale_state(path)
    if is_esrgan(state):
        return build_esrgan(state, path)
    raise _not_an_upscale_model(path, list(state))
