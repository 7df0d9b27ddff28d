"""What one input of a step is, and for model inputs, the recipe that rebuilds it.

Used by ``@node`` steps in a trace and by the workflow tracer for ComfyUI
nodes: each input is categorized; a model input gets its recipe (or the reason
it has none); models held inside intermediate data (a ControlNet in a control
hint) get theirs too; and when the step was observed running, ``used`` names
the parts of a model input whose modules actually ran (a step given a whole
pipeline that only calls its UNet has ``used == ("unet",)``), with a recipe per
part in ``parts``. Parts that are not torch modules (schedulers, tokenizers)
cannot be observed and are never listed in ``used``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsplit.tracer.categories import Category, categorize, embedded_models
from diffsplit.tracer.errors import NotOffloadable, UncategorizedInput
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.objects import describe, get_path, parts
from diffsplit.tracer.recipe import Recipe, join_path

_USED_DEPTH = 3
#: Makes the recipe of a model value (``name`` is used in refusals); raises NotOffloadable.
RecipeMaker = Callable[[Any, str], Recipe]


@dataclass(frozen=True)
class Explained:
    """A model (an input, or one held inside an input) with its recipe or the refusal."""

    path: str
    type_name: str
    recipe: Recipe | None = None
    refusal: NotOffloadable | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        data: dict[str, Any] = {"path": self.path, "type": self.type_name}
        if self.recipe is not None:
            data["recipe"] = self.recipe.to_dict()
        if self.refusal is not None:
            data["not_offloadable"] = self.refusal.reason
        return data


@dataclass(frozen=True)
class InputExplanation:
    """One input of a step: its category and, for models, how to rebuild it."""

    name: str
    type_name: str
    category: Category | None
    error: str | None = None
    model: Explained | None = None
    embedded: tuple[Explained, ...] = ()
    used: tuple[str, ...] | None = None
    parts: Mapping[str, Recipe] = field(default_factory=dict)

    @property
    def offloadable(self) -> bool:
        """Whether the input can be sent: categorized, and every model in it has a recipe."""
        models = ([self.model] if self.model is not None else []) + list(self.embedded)
        return self.error is None and all(item.recipe is not None for item in models)

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        data: dict[str, Any] = {"name": self.name, "type": self.type_name, "category": self.category}
        if self.error is not None:
            data["error"] = self.error
        if self.model is not None:
            data["model"] = self.model.to_dict()
        if self.embedded:
            data["embedded"] = [item.to_dict() for item in self.embedded]
        if self.used is not None:
            data["used"] = list(self.used)
            data["parts"] = {path: recipe.to_dict() for path, recipe in self.parts.items()}
        return data


def _explain_model(path: str, value: Any, make_recipe: RecipeMaker, label: str) -> Explained:
    try:
        return Explained(path, describe(value), recipe=make_recipe(value, label))
    except NotOffloadable as refusal:
        return Explained(path, describe(value), refusal=refusal)


def explain_input(
    name: str,
    value: Any,
    make_recipe: RecipeMaker,
    *,
    where: str,
    model_types: tuple[type, ...] = (),
) -> InputExplanation:
    """Categorize ``value`` (input ``name`` of step ``where``) and explain the models in it."""
    type_name = describe(value)
    try:
        category = categorize(value, name=name, model_types=model_types, where=where)
    except UncategorizedInput as error:
        return InputExplanation(name, type_name, None, error=str(error))
    label = f"{where}.{name}"
    if category == "model":
        return InputExplanation(
            name, type_name, category, model=_explain_model("", value, make_recipe, label)
        )
    if category == "intermediate":
        embedded = tuple(
            _explain_model(path, model, make_recipe, f"{label}.{path}")
            for path, model in embedded_models(value, model_types=model_types)
        )
        return InputExplanation(name, type_name, category, embedded=embedded)
    return InputExplanation(name, type_name, category)


def used_parts(value: Any, called: set[int], *, depth: int = 0) -> tuple[str, ...]:
    """Paths of the outermost modules in ``value`` (``""``: ``value`` itself) that ran, or ran a submodule.

    Containers (pipelines, dataclasses, tuples) are searched a few levels deep:
    a ``TextEncoders`` whose second encoder ran gives ``("encoders.1",)``.
    """
    if isinstance(value, torch.nn.Module):
        return ("",) if any(id(module) in called for module in value.modules()) else ()
    if depth >= _USED_DEPTH:
        return ()
    used: list[str] = []
    for name, part in parts(value):
        used.extend(join_path(name, inner) for inner in used_parts(part, called, depth=depth + 1))
    return tuple(used)


def with_used_parts(explanation: InputExplanation, value: Any, called: set[int]) -> InputExplanation:
    """``explanation`` with ``used`` and the recipes of the used parts filled in."""
    if explanation.category != "model":
        return explanation
    used = used_parts(value, called)
    recipe = explanation.model.recipe if explanation.model is not None else None
    recipes = {}
    if recipe is not None:
        for path in used:
            if path:
                part = get_path(value, path)
                recipes[path] = recipe.with_select(join_path(recipe.select, path), fingerprint(part))
    return InputExplanation(
        explanation.name,
        explanation.type_name,
        explanation.category,
        explanation.error,
        explanation.model,
        explanation.embedded,
        used,
        recipes,
    )


class ModuleUse:
    """Collects the ids of torch modules called on one thread (a global forward pre-hook).

    Use as a context manager around a step; read ``called`` afterwards.
    """

    def __init__(self) -> None:
        self.called: set[int] = set()
        self._thread = threading.get_ident()
        self._handle: Any = None

    def _seen(self, module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() == self._thread:
            self.called.add(id(module))

    def __enter__(self) -> ModuleUse:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._seen)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop collecting (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
