"""``diffsplit.offload``: run part of existing diffusers code on a worker without editing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsplit.engine.call_offload import CallSender, ModuleOffload, OffloadedPipeline, OffloadError
from diffsplit.engine.component_files import WeightsEdited, component_folder_ref
from diffsplit.engine.untraced_adapters import AdapterSteps, ContentFile, UnexplainedChange, adapter_steps
from diffsplit.tracer.files import HashingFileRefs
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.hub_cache import loader_path
from diffsplit.tracer.recipe import Recipe, Step
from diffsplit.transport.auth import ClientCurve
from diffsplit.transport.protocol import Settings


def offload(
    pipeline: Any,
    component: str | None = None,
    *,
    to: str,
    trace: Any | None = None,
    timeout_s: float | None = None,
    settings: Settings | None = None,
    curve: ClientCurve | None = None,
) -> ModuleOffload | OffloadedPipeline:
    """Run ``pipeline.<component>``'s forward (or, without a component, whole calls) on worker ``to``.

    The worker rebuilds the target from its recipe: from ``trace`` (a
    ``diffsplit.tracing()`` that saw the pipeline being loaded, LoRAs and all),
    or else from the files the pipeline was loaded from: a component from
    the files of its subfolder whose weights equal its own (found and
    checked here, so weights edited in place are refused before anything is
    sent; ``engine.component_files``), named by sha256 so a worker holding
    them in any layout serves it; LoRA adapters a component got outside any
    trace travel once by content (``engine.untraced_adapters``; the worker
    needs ``--allow-upload``). Either way the recipe
    carries a fingerprint of the weights as they are here, and the worker
    refuses to run if its rebuild differs, never giving a silently different
    result. ``curve`` (or DIFFSPLIT_CURVE_SERVER_KEY / DIFFSPLIT_CURVE_CLIENT_KEY)
    connects to a worker that requires CURVE. Returns a handle: ``restore()``
    (module) or ``close()`` (pipeline).
    """
    target = pipeline if component is None else getattr(pipeline, component, None)
    if target is None:
        raise OffloadError(f"{type(pipeline).__name__} has no component {component!r}")
    contents: tuple[ContentFile, ...] = ()
    if trace is not None:
        recipe = trace.recipe(target)
    elif component is not None:
        recipe, contents = _component_recipe(pipeline, component, target)
    else:
        recipe = _folder_recipe(pipeline, target)
    sender = CallSender(
        to, recipe.to_dict(), settings=settings or Settings(), timeout_s=timeout_s, curve=curve,
        contents={content.ref.sha256: content for content in contents},
    )
    if component is None:
        return OffloadedPipeline(pipeline, sender)
    return ModuleOffload(target, sender)


def _changes_beyond_folder(pipeline: Any, target: Any) -> str:
    """What was done to ``target`` since ``from_pretrained`` that its folder cannot rebuild ("" if none).

    LoRA adapters (loaded, fused or merged) are seen here, before anything is sent; anything else the worker's
    fingerprint check still refuses.
    """
    modules = target.modules() if isinstance(target, torch.nn.Module) else (
        module for value in vars(pipeline).values() if isinstance(value, torch.nn.Module)
        for module in value.modules()
    )
    if any(getattr(module, "peft_config", None) for module in modules):
        return "LoRA adapters are loaded"
    if getattr(pipeline, "num_fused_loras", 0):
        return "LoRA weights are fused"
    return ""


def _component_recipe(pipeline: Any, component: str, target: Any) -> tuple[Recipe, tuple[ContentFile, ...]]:
    """The component alone from the files it came from, its adapters loaded from their content.

    The files are found by the module's own weights (``engine.component_files``): weights edited in place
    since loading are refused here, before anything is sent.
    """
    folder = _loaded_folder(pipeline)
    if getattr(pipeline, "num_fused_loras", 0):
        raise OffloadError(f"no trace given and {type(pipeline).__name__} has LoRA weights fused into it: a "
                           f"worker cannot separate them; {_TRACE_FIX}")
    if not isinstance(target, torch.nn.Module):
        return _folder_recipe(pipeline, target, component), ()
    try:
        adapters = adapter_steps(target) if getattr(target, "peft_config", None) else AdapterSteps((), ())
    except UnexplainedChange as exc:
        raise OffloadError(f"no trace given and {component}'s adapters cannot be sent: {exc}") from None
    try:
        files = component_folder_ref(folder, component, target, HashingFileRefs().sha256)
    except WeightsEdited as exc:
        raise OffloadError(f"no trace given and {component} cannot be rebuilt from {folder.name}: {exc}; "
                           f"{_TRACE_FIX}") from None
    kwargs: dict[str, Any] = {"subfolder": component}
    dtype = getattr(target, "dtype", None)
    if isinstance(dtype, torch.dtype):
        kwargs["torch_dtype"] = str(dtype).removeprefix("torch.")
    library = "transformers" if type(target).__module__.startswith("transformers") else "diffusers"
    base = Step(op=f"{library}.from_pretrained", cls=type(target).__name__, file=files, kwargs=kwargs)
    return Recipe(steps=(base, *adapters.steps), fingerprint=fingerprint(target)), adapters.files


_TRACE_FIX = "load it inside `with diffsplit.tracing() as trace:` and pass trace=trace"


def _loaded_folder(pipeline: Any) -> Path:
    """The local folder ``pipeline`` was loaded from; OffloadError when it names none."""
    folder = loader_path(str(getattr(pipeline, "name_or_path", "") or ""))
    if folder is None or not folder.is_dir():
        raise OffloadError(
            f"no trace given and {type(pipeline).__name__} does not name a local folder it was loaded from; "
            f"{_TRACE_FIX}"
        )
    return folder


def _folder_recipe(pipeline: Any, target: Any, component: str | None = None) -> Recipe:
    """``from_pretrained(<the folder it came from>)`` plus the current weights' fingerprint."""
    folder = _loaded_folder(pipeline)
    changed = _changes_beyond_folder(pipeline, target)
    if changed:
        raise OffloadError(
            f"no trace given and {type(pipeline).__name__} was changed after loading ({changed}): a worker "
            f"rebuilding from {folder.name} would get other weights; load it inside "
            "`with diffsplit.tracing() as trace:` and pass trace=trace"
        )
    dtype = getattr(pipeline, "dtype", None)
    kwargs = {"torch_dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}
    step = Step(op="diffusers.from_pretrained", cls=type(pipeline).__name__,
                file=HashingFileRefs().file_ref(folder), kwargs=kwargs)
    return Recipe(steps=(step,), select=component or "", fingerprint=fingerprint(target))
