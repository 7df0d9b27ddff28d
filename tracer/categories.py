"""Input categories: every input of a node or step is a normal value, intermediate data, or a model.

- **normal**: None, numbers, strings, bools, enums, dtypes, devices, and
  lists/tuples/dicts of them: sent inline.
- **intermediate**: tensors, generators, arrays, images, and containers holding
  any (ComfyUI LATENT dicts, CONDITIONING lists, control hints): sent as
  tensor frames. Models inside them (a ControlNet in a control hint) are
  found with :func:`embedded_models` and sent as recipes.
- **model**: torch modules, diffusers pipelines and schedulers, tokenizers and
  processors, instances of the ``model_types`` a caller registers (the
  engine's ``DiffusionModel``, ``TextEncoders``…), and any dataclass, list or
  dict made only of models and normal values: sent as recipes.

Anything else raises :class:`UncategorizedInput` naming the input and its type.
The tracer cannot import the engine, so engine types come in through
``model_types`` or are recognized by that structural rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from diffsplit.tracer.errors import UncategorizedInput
from diffsplit.tracer.objects import is_pipeline, parts
from diffsplit.tracer.recipe import join_path

Category = Literal["normal", "intermediate", "model"]

#: Base classes (by library and name) whose instances are models.
MODEL_BASE_CLASSES: frozenset[tuple[str, str]] = frozenset(
    {
        ("diffusers", "DiffusionPipeline"),
        ("diffusers", "SchedulerMixin"),
        ("diffusers", "ModelMixin"),
        ("transformers", "PreTrainedModel"),
        ("transformers", "PreTrainedTokenizerBase"),
        ("transformers", "ImageProcessingMixin"),
        ("transformers", "FeatureExtractionMixin"),
        ("transformers", "ProcessorMixin"),
    }
)
_NORMAL_TYPES = (bool, int, float, str, bytes, enum.Enum, torch.dtype, torch.device)
_MAX_DEPTH = 32


def _library_model(value: Any) -> bool:
    for base in type(value).__mro__:
        library = base.__module__.partition(".")[0]
        if (library, base.__name__) in MODEL_BASE_CLASSES:
            return True
    return False


def _data_leaf(value: Any) -> bool:
    if isinstance(value, torch.Tensor | torch.Generator):
        return True
    module = type(value).__module__.partition(".")[0]
    return (module == "numpy" and type(value).__name__ == "ndarray") or module == "PIL"


def _is_model_leaf(value: Any, model_types: tuple[type, ...]) -> bool:
    return (
        (bool(model_types) and isinstance(value, model_types))
        or isinstance(value, torch.nn.Module)
        or is_pipeline(value)
        or _library_model(value)
    )


def _container_items(value: Any) -> list[Any] | None:
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, Mapping):
        return list(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, field.name, None) for field in dataclasses.fields(value)]
    return None


def _category(
    value: Any, model_types: tuple[type, ...], name: str, where: str | None, depth: int
) -> Category:
    if value is None or isinstance(value, _NORMAL_TYPES):
        return "normal"
    if _is_model_leaf(value, model_types):
        return "model"
    if _data_leaf(value):
        return "intermediate"
    items = _container_items(value)
    if items is None or depth > _MAX_DEPTH:
        raise UncategorizedInput(name, type(value).__name__, where=where)
    kinds = {_category(item, model_types, name, where, depth + 1) for item in items}
    if "intermediate" in kinds:
        return "intermediate"
    if "model" in kinds:
        return "model"
    return "normal"


def categorize(
    value: Any, *, name: str = "input", model_types: tuple[type, ...] = (), where: str | None = None
) -> Category:
    """The category of an input value; UncategorizedInput (naming ``name`` and the type) if none fits.

    ``where`` names the node or step for the error message.
    """
    return _category(value, tuple(model_types), name, where, 0)


def embedded_models(value: Any, *, model_types: tuple[type, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(path, model) for each model held inside a container, outermost first, each object once.

    For ``CONDITIONING`` with a control hint this yields
    ``("0.1.control.controlnet", ControlNet(...))``.
    """
    seen: set[int] = set()
    pending: list[tuple[str, Any, int]] = [("", value, 0)]
    while pending:
        path, current, depth = pending.pop(0)
        if id(current) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(current))
        if path and _is_model_leaf(current, model_types):
            yield path, current
            continue
        if _data_leaf(current) or current is None or isinstance(current, _NORMAL_TYPES):
            continue
        if _container_items(current) is None:
            continue
        if _model_only(current, model_types) and path:
            yield path, current
            continue
        pending.extend((join_path(path, part_name), part, depth + 1) for part_name, part in parts(current))


def _model_only(value: Any, model_types: tuple[type, ...]) -> bool:
    try:
        return _category(value, model_types, "", None, 0) == "model"
    except UncategorizedInput:
        return False
