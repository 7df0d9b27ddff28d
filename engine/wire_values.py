"""Node input and output values <-> data the envelope can carry.

The envelope carries plain data and tensors. Node values also hold models
(MODEL, CLIP, VAE, CONTROL_NET, CLIP_VISION) and, inside CONDITIONING, ControlNet hints
that hold a model. Models never travel: each becomes its recipe (a dict), and
the receiving side builds or finds the model from it. Two more forms save
bytes: an all-zero tensor travels as its shape and dtype (an empty latent),
and a value the peer already holds travels as its content digest.

Markers are one-key dicts whose key starts with ``"$ds:"``; plain node values
never use such keys.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from diffsplit.engine.sampling.samplers import Sampler, get_sampler
from diffsplit.engine.types import (
    ClipVision,
    ControlHint,
    ControlNet,
    DiffusionModel,
    Guider,
    NoiseSource,
    TextEncoders,
    UpscaleModel,
    Vae,
)
from diffsplit.engine.value_walk import iter_values
from diffsplit.transport.digest import content_digest
from diffsplit.transport.errors import DiffsplitError

MODEL = "$ds:model"
CONTROL = "$ds:control"
#: The longest control-hint label kept from a peer.
MAX_HINT_LABEL_CHARS = 120
ZEROS = "$ds:zeros"
HELD = "$ds:held"
GENERATOR = "$ds:generator"
OUTPUT = "$ds:output"
SAMPLER = "$ds:sampler"
NOISE = "$ds:noise"
GUIDER = "$ds:guider"
MARKERS = frozenset({MODEL, CONTROL, ZEROS, HELD, GENERATOR, OUTPUT, SAMPLER, NOISE, GUIDER})
#: Limits on an all-zero tensor described by shape (the same as the envelope's defaults).
MAX_ZEROS_BYTES = 2 << 30
MAX_ZEROS_DIMS = 8
#: Libraries whose ``BaseOutput`` result classes may be named on the wire (looked up, never imported by path).
_OUTPUT_LIBRARIES = ("diffusers.",)

#: The recipe (as a plain dict) that rebuilds a model object, or None when it cannot be explained.
RecipeOf = Callable[[Any], Mapping[str, Any] | None]
#: Builds (or finds in a cache) the model a recipe describes.
BuildModel = Callable[[Mapping[str, Any]], Any]


class WireValueError(DiffsplitError):
    """A value cannot be sent, or a received value is not well formed."""


def is_model_value(value: Any) -> bool:
    """Whether a value is a model (recipe on the wire) rather than data."""
    from diffsplit.engine.lazy_models import LazyModel

    if isinstance(value, LazyModel):  # a loader output not built here (yet)
        return True
    if isinstance(value, torch.nn.Module | DiffusionModel | TextEncoders | Vae | ControlNet | ClipVision):
        return True
    if isinstance(value, UpscaleModel):
        return True
    if isinstance(getattr(value, "components", None), dict):  # a diffusers pipeline
        return True
    # schedulers, tokenizers, feature extractors: configured library objects, rebuilt from recipes
    library = type(value).__module__.partition(".")[0]
    return library in ("diffusers", "transformers") and not isinstance(value, dict | torch.Tensor)


def to_wire(value: Any, recipe_of: RecipeOf, *, where: str) -> Any:
    """``value`` as envelope data; ``where`` names the input for error messages."""
    if isinstance(value, torch.Tensor):
        if value.numel() > 0 and not value.is_floating_point() and value.dtype != torch.bool:
            return value
        if value.numel() > 0 and not bool(value.any()):
            return {ZEROS: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}}
        return value
    if isinstance(value, ControlHint):
        return {CONTROL: _hint_to_wire(value, recipe_of, where)}
    if isinstance(value, Sampler):
        return {SAMPLER: value.name}
    if isinstance(value, NoiseSource):
        return {NOISE: value.seed}
    if isinstance(value, Guider):
        guider = {
            "model": {MODEL: _recipe_or_fail(value.model, recipe_of, f"{where}.model")},
            "positive": to_wire(value.positive, recipe_of, where=f"{where}.positive"),
            "negative": to_wire(value.negative, recipe_of, where=f"{where}.negative"),
            "cfg": float(value.cfg),
        }
        if value.middle is not None:  # DualCFGGuider
            guider.update(middle=to_wire(value.middle, recipe_of, where=f"{where}.middle"),
                          cfg_middle=float(value.cfg_middle), nested=bool(value.nested))
        return {GUIDER: guider}
    if isinstance(value, torch.Generator):
        return {GENERATOR: {"device": str(value.device), "state": value.get_state()}}
    if _is_library_output(value):
        fields = {  # every field: a BaseOutput's dict view leaves out the ones that are None
            f.name: to_wire(getattr(value, f.name), recipe_of, where=f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
        return {OUTPUT: {"type": f"{type(value).__module__}:{type(value).__qualname__}", "fields": fields}}
    if is_model_value(value):
        return {MODEL: _recipe_or_fail(value, recipe_of, where)}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise WireValueError(f"{where}: dict keys must be strings, got {type(key).__name__}")
            if key in MARKERS:
                raise WireValueError(f"{where}: key {key!r} is reserved")
        return {key: to_wire(item, recipe_of, where=f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [to_wire(item, recipe_of, where=f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if value is None or isinstance(value, bool | int | float | str | bytes | np.ndarray):
        return value
    raise WireValueError(
        f"{where}: a {type(value).__module__}.{type(value).__name__} cannot be sent to a worker "
        "(not a number, string, tensor, tensor container or traced model)"
    )


class HintTable:
    """The ControlNet hints decoded so far, one object per distinct hint (by its wire payload's digest).

    Locally, ControlNetApplyAdvanced puts *one* hint object into both the
    positive and the negative conditioning, and the sampler runs entries whose
    hint is the same object as one batch. The wire carries each occurrence as
    its own payload; decoding through one table gives equal payloads one
    object again, within a request and across held values, so the worker
    batches cond and uncond exactly as the local run does. Entries live as
    long as some value still holds the hint.
    """

    def __init__(self) -> None:
        self._hints: weakref.WeakValueDictionary[str, ControlHint] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def find_or_make(self, payload: Mapping[str, Any], make: Callable[[], ControlHint]) -> ControlHint:
        """The hint decoded earlier from an equal payload, else ``make()`` (remembered)."""
        digest = content_digest(payload)
        with self._lock:
            found = self._hints.get(digest)
        if found is not None:
            return found
        hint = make()  # builds the ControlNet: not under the lock
        with self._lock:
            return self._hints.setdefault(digest, hint)

    def __len__(self) -> int:
        with self._lock:
            return len(self._hints)


def from_wire(
    data: Any,
    build_model: BuildModel,
    held: Mapping[str, Any] | None = None,
    hints: HintTable | None = None,
) -> Any:
    """Rebuild a node value from envelope data (the inverse of :func:`to_wire`).

    Equal ControlNet hints come back as one object (see :class:`HintTable`):
    within ``data`` always, and across calls that pass the same ``hints``.
    """
    return _from_wire(data, build_model, held, hints if hints is not None else HintTable())


def _from_wire(data: Any, build_model: BuildModel, held: Mapping[str, Any] | None, hints: HintTable) -> Any:
    if isinstance(data, dict):
        if len(data) == 1:
            (key, payload), = data.items()
            if key == MODEL:
                return build_model(payload)
            if key == CONTROL:
                return _hint_from_wire(payload, build_model, held, hints)
            if key == ZEROS:
                return _zeros(payload)
            if key == GENERATOR:
                return _generator(payload)
            if key == OUTPUT:
                return _library_output(payload, build_model, held, hints)
            if key == SAMPLER:
                return _sampler(payload)
            if key == NOISE:
                if payload is not None and (type(payload) is not int or payload < 0):
                    raise WireValueError(f"a noise seed must be an integer >= 0 or null, not {payload!r}")
                return NoiseSource(payload)
            if key == GUIDER:
                return _guider(payload, build_model, held, hints)
            if key == HELD:
                if held is None or not isinstance(payload, str) or payload not in held:
                    raise WireValueError(f"value {str(payload)[:12]}… is not held here")
                return held[payload]
        return {key: _from_wire(item, build_model, held, hints) for key, item in data.items()}
    if isinstance(data, list):
        return [_from_wire(item, build_model, held, hints) for item in data]
    if isinstance(data, tuple):
        return tuple(_from_wire(item, build_model, held, hints) for item in data)
    return data


def _recipe_or_fail(value: Any, recipe_of: RecipeOf, where: str) -> Mapping[str, Any]:
    recipe = recipe_of(value)
    if recipe is None:
        raise WireValueError(
            f"{where}: not offloadable: no recipe explains this {type(value).__name__} "
            "(it was not produced by a traced loader, or was changed after loading)"
        )
    return recipe


def _hint_to_wire(hint: ControlHint, recipe_of: RecipeOf, where: str) -> dict[str, Any]:
    fields = {f.name: getattr(hint, f.name) for f in dataclasses.fields(hint)}
    fields["controlnet"] = _recipe_or_fail(hint.controlnet, recipe_of, f"{where}.control")
    fields["previous"] = None if hint.previous is None else _hint_to_wire(hint.previous, recipe_of, where)
    return fields


def _hint_from_wire(
    payload: Mapping[str, Any], build_model: BuildModel, held: Any, hints: HintTable
) -> ControlHint:
    if not isinstance(payload, Mapping):
        raise WireValueError("a control hint is not a mapping")

    def make() -> ControlHint:
        controlnet = build_model(payload["controlnet"])
        if not isinstance(controlnet, ControlNet):
            raise WireValueError("a control hint's recipe did not build a ControlNet")
        previous = payload.get("previous")
        return ControlHint(
            controlnet=controlnet,
            image=_from_wire(payload["image"], build_model, held, hints),
            strength=float(payload["strength"]),
            start_percent=float(payload["start_percent"]),
            end_percent=float(payload["end_percent"]),
            previous=None if previous is None else _hint_from_wire(previous, build_model, held, hints),
            label=str(payload.get("label", ""))[:MAX_HINT_LABEL_CHARS],
        )

    try:
        return hints.find_or_make(payload, make)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireValueError(f"a control hint is not well formed: {type(exc).__name__}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ZerosSpec:
    """A well-formed all-zero tensor descriptor: its shape, dtype and the bytes it allocates."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """The bytes ``torch.zeros`` allocates for it."""
        return math.prod(self.shape) * self.dtype.itemsize


def zeros_spec(payload: Any) -> ZerosSpec:
    """A ``$ds:zeros`` payload checked (shape of whole numbers >= 0, a torch dtype, at most 2 GiB)."""
    dtype = getattr(torch, str(payload.get("dtype", "")), None) if isinstance(payload, Mapping) else None
    shape = payload.get("shape") if isinstance(payload, Mapping) else None
    well_formed = isinstance(dtype, torch.dtype) and isinstance(shape, list | tuple)
    if not well_formed or len(shape) > MAX_ZEROS_DIMS:
        raise WireValueError(f"bad zeros descriptor {str(payload)[:200]}")
    if not all(type(n) is int for n in shape):
        raise WireValueError(f"a zeros descriptor's shape must be whole numbers, not {str(shape)[:200]}")
    spec = ZerosSpec(tuple(shape), dtype)
    if any(n < 0 for n in spec.shape) or spec.nbytes > MAX_ZEROS_BYTES:
        raise WireValueError(
            f"a zeros tensor of shape {list(spec.shape)} is negative or over {MAX_ZEROS_BYTES} bytes")
    return spec


def _zeros(payload: Mapping[str, Any]) -> torch.Tensor:
    spec = zeros_spec(payload)
    return torch.zeros(spec.shape, dtype=spec.dtype)


def decoded_bytes(data: Any, held: Mapping[str, Any] | None = None) -> int:
    """The bytes the receiver holds once ``data`` is decoded, summed before anything is allocated.

    Counted: tensors and arrays already received (the message's frames), every
    all-zero tensor described by shape (each ``$ds:zeros`` allocates), strings
    and bytes, and every reference to a held value (each one the node may
    copy). Models (recipes) are not counted: the model cache has its own budget.
    A malformed descriptor raises WireValueError, so nothing that is refused
    later is left uncounted.
    """
    total = 0
    for item in iter_values(data, descend=lambda part: _marker(part) not in (ZEROS, HELD, MODEL)):
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, np.ndarray):
            total += int(item.nbytes)
        elif isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif _marker(item) == ZEROS:
            total += zeros_spec(item[ZEROS]).nbytes
        elif _marker(item) == HELD:
            digest = item[HELD]
            found = held.get(digest) if held is not None and isinstance(digest, str) else None
            total += value_bytes(found)
    return total


def _marker(item: Any) -> str | None:
    """The descriptor key of a one-key mapping (``$ds:zeros``, ``$ds:held``, ...), else None."""
    if isinstance(item, Mapping) and len(item) == 1:
        key = next(iter(item))
        return key if isinstance(key, str) else None
    return None


def value_bytes(value: Any) -> int:
    """Bytes of the tensors in a decoded value (containers and dataclasses walked; models left out)."""
    parts = iter_values(value, into_dataclasses=True, unique=True,
                        descend=lambda item: not is_model_value(item))
    return sum(item.numel() * item.element_size() for item in parts if isinstance(item, torch.Tensor))


def _is_library_output(value: Any) -> bool:
    from_library = type(value).__module__.startswith(_OUTPUT_LIBRARIES)
    return isinstance(value, dict) and from_library and dataclasses.is_dataclass(value)


def _generator(payload: Mapping[str, Any]) -> torch.Generator:
    device = payload.get("device") if isinstance(payload, dict) else None
    state = payload.get("state") if isinstance(payload, dict) else None
    if device != "cpu" or not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise WireValueError("only CPU generators travel (device 'cpu', a uint8 state)")
    generator = torch.Generator(device="cpu")
    try:
        generator.set_state(state.clone())
    except RuntimeError:
        raise WireValueError(f"a CPU generator state of {state.numel()} bytes is not a valid state") from None
    return generator


def _library_output(payload: Mapping[str, Any], build_model: BuildModel, held: Any, hints: HintTable) -> Any:
    """A diffusers ``BaseOutput`` result, its class found by name among already-imported modules."""
    import sys

    from diffusers.utils import BaseOutput

    if not isinstance(payload, dict):
        raise WireValueError("a library result must be a mapping with 'type' and 'fields'")
    module_name, _, qualname = str(payload.get("type", "")).partition(":")
    module = sys.modules.get(module_name) if module_name.startswith(_OUTPUT_LIBRARIES) else None
    cls = getattr(module, qualname, None) if module is not None and "." not in qualname else None
    fields = _from_wire(payload.get("fields", {}), build_model, held, hints)
    if not (isinstance(cls, type) and issubclass(cls, BaseOutput)) or not isinstance(fields, dict):
        raise WireValueError(f"unknown result type {payload.get('type')!r}")
    return cls(**fields)


def _sampler(name: Any) -> Sampler:
    try:
        return get_sampler(str(name))
    except ValueError as exc:
        raise WireValueError(str(exc)) from None


_GUIDER_KEYS = frozenset({"model", "positive", "negative", "cfg"})
_DUAL_GUIDER_KEYS = _GUIDER_KEYS | {"middle", "cfg_middle", "nested"}


def _guider(payload: Any, build_model: BuildModel, held: Any, hints: HintTable) -> Guider:
    if not isinstance(payload, Mapping) or set(payload) not in (_GUIDER_KEYS, _DUAL_GUIDER_KEYS):
        raise WireValueError("a guider is {model, positive, negative, cfg} (+ {middle, cfg_middle, nested})")
    model = _from_wire(payload["model"], build_model, held, hints)
    if not isinstance(model, DiffusionModel):
        raise WireValueError("a guider's recipe did not build a MODEL")
    scales = [payload["cfg"], payload.get("cfg_middle", 1.0)]
    for cfg in scales:
        if type(cfg) not in (int, float) or not math.isfinite(cfg):
            raise WireValueError(f"a guider's cfg must be a finite number, not {cfg!r}")
    if type(payload.get("nested", False)) is not bool:
        raise WireValueError("a guider's 'nested' must be true or false")
    middle = payload.get("middle")
    return Guider(model, _from_wire(payload["positive"], build_model, held, hints),
                  _from_wire(payload["negative"], build_model, held, hints), float(scales[0]),
                  middle=None if middle is None else _from_wire(middle, build_model, held, hints),
                  cfg_middle=float(scales[1]), nested=payload.get("nested", False))
