"""Text for people: recipe steps as calls, and the chain of loaders behind a model input.

``KSampler.model ← LoraLoader(tiny-sd15-lora.safetensors, 0.8, 0.8) ←
CheckpointLoaderSimple(tiny-sd15.safetensors sha256:ab12cd34…)``: the chain
starts at the step that made the object and walks back to the file it all came
from (through a graph loader's first model input, or a diffusers recipe's
mutators back to its loader). Only the last link shows a sha256.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffsplit.tracer.inputs import InputExplanation
from diffsplit.tracer.recipe import FileRef, Recipe, Step

_MAX_TEXT = 40


def _value_text(value: Any, with_sha: bool = False) -> str:
    if isinstance(value, Recipe):
        return "…"
    if isinstance(value, FileRef):
        return value.short() if with_sha else value.name
    if isinstance(value, tuple):
        return "[" + ", ".join(_value_text(item, with_sha) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{…}"
    text = repr(value)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def step_name(step: Step) -> str:
    """The call a step stands for: ``LoraLoader``, ``UNet2DConditionModel.from_pretrained``, ``fuse_lora``."""
    method = step.op.rpartition(".")[2]
    if step.op == "comfy.node":
        return step.cls or "node"
    if step.op == "user.loader":
        return (step.cls or "loader").rpartition(":")[2]
    if step.op == "set":
        return "replace"
    if step.is_mutator:
        return method
    return f"{step.cls}.{method}" if step.cls else step.op


def describe_step(step: Step, *, with_sha: bool = False) -> str:
    """``name(file, args…, key=value…)``; nested recipes are left out, files show their sha256 if asked.

    Graph loader nodes show their widget values without names, as in
    ``LoraLoader(tiny-sd15-lora.safetensors, 0.8, 0.8)``.
    """
    shown = []
    if step.file is not None:
        shown.append(step.file.short() if with_sha else step.file.name)
    shown.extend(_value_text(value, with_sha) for value in step.args)
    for key, value in step.kwargs.items():
        if isinstance(value, Recipe):
            continue
        text = _value_text(value, with_sha)
        shown.append(text if step.op == "comfy.node" else f"{key}={text}")
    target = f" on .{step.on}" if step.on else ""
    return f"{step_name(step)}({', '.join(shown)}){target}"


def _first_nested(step: Step) -> Recipe | None:
    for value in (*step.args, *step.kwargs.values()):
        if isinstance(value, Recipe):
            return value
    return None


def chain(recipe: Recipe) -> list[str]:
    """The loader calls behind ``recipe``'s object, latest first; the last one with its file's sha256."""
    links: list[str] = []
    current: Recipe | None = recipe
    while current is not None:
        for step in reversed(current.steps[1:]):
            links.append(describe_step(step))
        first = current.steps[0]
        nested = _first_nested(first)
        links.append(describe_step(first, with_sha=nested is None))
        current = nested
    return links


def render_chain(head: str, recipe: Recipe) -> str:
    """``head ← link ← link…`` plus the select path when there is one."""
    select = f"  [select {recipe.select}]" if recipe.select else ""
    return " ← ".join([head, *chain(recipe)]) + select


def input_lines(owner: str, item: InputExplanation) -> list[str]:
    """Report lines for one input: its category, and the loader chain of each model in it."""
    if item.error is not None:
        return [f"{item.name}: error: {item.error}"]
    lines = [f"{item.name}: {item.category} ({item.type_name})"]
    models = ([item.model] if item.model is not None else []) + list(item.embedded)
    for model in models:
        head = f"{owner}.{item.name}" + (f".{model.path}" if model.path else "")
        if model.recipe is not None:
            lines.append(f"  {render_chain(head, model.recipe)}  ({model.recipe.size_bytes()} B)")
        elif model.refusal is not None:
            lines.append(f"  {head}: not offloadable: {model.refusal.reason}")
    if item.used is not None and item.category == "model":
        lines.append(f"  used: {', '.join(path or '(itself)' for path in item.used) or 'no modules ran'}")
    return lines
