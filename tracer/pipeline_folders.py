"""A diffusers pipeline folder seen as components: which one a recipe selects, and the files it needs.

A recipe that loads a pipeline folder and selects one component
(``pipe.unet``), with every later step acting on that component, is built on a
worker from that component's subfolder alone (``engine.rebuild``). Its folder
reference then needs to list only ``model_index.json`` and the component's
own files: a worker that holds the UNet and its config serves it, and reads
nothing else. A pipeline's own LoRA steps (``pipe.load_lora_weights``,
``pipe.set_adapters``) become the same steps on its UNet alone
(:func:`component_steps`), so a LoRA'd UNet is built without its pipeline too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffsplit.tracer.ops import PIPELINE_LORA_OP
from diffsplit.tracer.recipe import FileRef, Recipe, Step

MODEL_INDEX = "model_index.json"
_MODEL_INDEX_MAX_BYTES = 1 << 20


def selected_component(recipe: Recipe) -> str | None:
    """The component a one-step folder load of a pipeline selects, by the recipe's shape alone.

    None for other recipes, and where the recipe passes that component itself (``vae=``) or loads a
    subfolder. Whether the class is a pipeline is the caller's to check.
    """
    head = recipe.select.partition(".")[0]
    if not _loads_folder_for(recipe.steps[0], head):
        return None
    if not all(_on_component(step.on, head) for step in recipe.steps[1:]):
        return None
    return head


def _loads_folder_for(step: Step, head: str) -> bool:
    """Whether ``step`` loads a pipeline folder of which ``head`` can be a component built alone."""
    if step.op != "diffusers.from_pretrained" or step.file is None or step.file.kind != "dir":
        return False
    return head.isidentifier() and not head.startswith("_") and head not in step.kwargs \
        and "subfolder" not in step.kwargs


def _on_component(on: str | None, head: str) -> bool:
    return on is not None and (on == head or on.startswith(f"{head}."))


def component_steps(recipe: Recipe, pipeline: Any) -> Recipe:
    """``recipe`` (of ``pipeline.unet``) with the pipeline's own LoRA steps made steps on the UNet alone.

    ``pipe.load_lora_weights(file)`` becomes :data:`~diffsplit.tracer.ops.PIPELINE_LORA_OP` on the UNet
    (the pipeline class reads the file and loads the UNet's part, as ``load_lora_weights`` does), and
    ``pipe.set_adapters(names, weights)`` the UNet's ``set_adapters`` with the weights the pipeline
    gives its UNet. Any other step on the whole pipeline leaves the recipe as it is.
    """
    head = recipe.select.partition(".")[0]
    if head != "unet" or not hasattr(type(pipeline), "load_lora_into_unet"):
        return recipe
    if not _loads_folder_for(recipe.steps[0], head):
        return recipe
    steps = [recipe.steps[0]]
    for step in recipe.steps[1:]:
        if step.on != "":
            steps.append(step)
        elif step.op == "diffusers.load_lora_weights" and step.file is not None and not step.args:
            steps.append(Step(op=PIPELINE_LORA_OP, cls=type(pipeline).__name__, file=step.file,
                              kwargs=step.kwargs, on=head))
        elif step.op == "diffusers.set_adapters" and not step.args and set(step.kwargs) <= _SET_ADAPTERS:
            weights = _component_weights(step, head)
            if weights is None:
                return recipe
            names = step.kwargs["adapter_names"]
            steps.append(Step(op="diffusers.set_adapters", on=head,
                              kwargs={"adapter_names": names, "weights": weights}))
        else:
            return recipe
    return replace(recipe, steps=tuple(steps))


_SET_ADAPTERS = frozenset({"adapter_names", "adapter_weights"})


def _component_weights(step: Step, component: str) -> tuple[Any, ...] | None:
    """The weights ``pipe.set_adapters`` gives ``component`` (as diffusers splits them), or None."""
    names = step.kwargs.get("adapter_names")
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, tuple):
        return None
    given = step.kwargs.get("adapter_weights")
    weights = list(given) if isinstance(given, tuple) else [given] * len(names)
    if len(weights) != len(names):
        return None
    return tuple(weight.get(component) if isinstance(weight, Mapping) else weight for weight in weights)


def component_class(folder: Path, name: str) -> tuple[str | None, str | None]:
    """(library, class) that the folder's ``model_index.json`` names for component ``name``; (None, None)."""
    index_path = folder / MODEL_INDEX
    try:
        if index_path.stat().st_size > _MODEL_INDEX_MAX_BYTES:
            return None, None
        entry = json.loads(index_path.read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None, None
    if (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")
            and isinstance(entry[1], str) and (folder / name).is_dir()):
        return entry[0], entry[1]
    return None, None


def narrowed_to_component(recipe: Recipe, folder: Path) -> Recipe:
    """``recipe`` with its folder reference cut to ``model_index.json`` and the selected component's
    files, where the recipe selects a component the worker builds alone (``folder``: the local folder
    the pipeline was loaded from); the recipe unchanged otherwise."""
    name = selected_component(recipe)
    step = recipe.steps[0]
    ref = step.file
    if name is None or ref is None or not ref.files or component_class(folder, name)[0] is None:
        return recipe
    if any(isinstance(value, Recipe) for value in step.kwargs.values()):
        return recipe  # a component passed in (vae=…) is built by the pipeline load
    needed = tuple(item for item in ref.files if item.path == MODEL_INDEX or item.path.startswith(f"{name}/"))
    if not any(item.path == MODEL_INDEX for item in needed):
        return recipe
    narrowed = FileRef.folder_of(ref.name, needed, ref.folder)
    return replace(recipe, steps=(replace(step, file=narrowed), *recipe.steps[1:]))
