"""Rebuilding a model object from a recipe, on any machine, from that machine's own files.

``build(recipe, resolve_file)`` runs the recipe's steps and returns the
selected object, after checking its weight fingerprint. Only the operations in
``tracer.known_loaders.OPS`` run; classes are looked up by name only in the
top-level namespace of diffusers or transformers, and only if they derive from
a pipeline, model, scheduler or tokenizer base class — never an import path
taken from a recipe. Graph loader steps run engine loader nodes (``is_loader``)
from the registry; ``@loader`` functions run only when the caller passes them
in ``user_loaders``. After every step the built object's weights are moved
into allocator-owned memory (``tracer.owned_memory``), as the tracer does for
the client's loaders, so both sides compute on equally placed weights.
Files come from ``resolve_file(FileRef) -> Path`` (a
worker looks them up by sha256 in its store).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.tracer.errors import FingerprintMismatch, RecipeError
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.known_loaders import OPS
from diffsplit.tracer.objects import get_path
from diffsplit.tracer.owned_memory import own_weights
from diffsplit.tracer.recipe import FileRef, Recipe, Step
from diffsplit.transport.errors import DiffsplitError

FileResolver = Callable[[FileRef], Path]

#: Base classes (per library) a recipe's class must derive from.
ALLOWED_BASES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "diffusers": frozenset({"DiffusionPipeline", "ModelMixin", "SchedulerMixin"}),
        "transformers": frozenset({"PreTrainedModel", "PreTrainedTokenizerBase"}),
    }
)
#: dtype names a recipe may use.
ALLOWED_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
    }
)
_DTYPE_KEYWORDS = frozenset({"dtype", "torch_dtype"})


def allowed_class(library: str, name: str | None) -> type:
    """The class ``name`` exported by ``library`` if it is a pipeline/model/scheduler/tokenizer class."""
    bases = ALLOWED_BASES.get(library)
    if bases is None or not name or not name.isidentifier():
        raise RecipeError(f"class {name!r} of {library!r} is not allowed in a recipe")
    module = importlib.import_module(library)
    cls = getattr(module, name, None)
    if not isinstance(cls, type) or not any(
        base.__name__ in bases and base.__module__.partition(".")[0] == library for base in cls.__mro__
    ):
        raise RecipeError(
            f"{library}.{name} is not a {library} pipeline, model, scheduler or tokenizer class"
        )
    return cls


class _RecipeNodeContext:
    """The NodeContext of a loader node rebuilt from a recipe: model files come from the recipe."""

    def __init__(self, node_id: str, files: Mapping[tuple[str, str], Path]) -> None:
        self.node_id = node_id
        self._files = files

    def model_path(self, folder: str, name: str) -> Path:
        """The file the recipe named for ``name`` in ``folder``."""
        path = self._files.get((folder, name)) or self._files.get(("", name))
        if path is None:
            raise RecipeError(
                f"the recipe's {self.node_id} asks for {folder}/{name}, which the recipe does not name"
            )
        return path

    def input_path(self, name: str) -> Path:
        """Loader nodes read no input files."""
        raise RecipeError(f"a loader node rebuilt from a recipe cannot read the input {name!r}")

    def output_dir(self) -> Path:
        """Loader nodes write nothing."""
        raise RecipeError("a loader node rebuilt from a recipe cannot write outputs")

    def progress(self, step: int, total: int) -> None:
        """Progress of a loader is not reported."""

    def save_image(self, image: Any, filename_prefix: str, *, temporary: bool) -> Path:
        """Loader nodes save no images."""
        raise RecipeError("a loader node rebuilt from a recipe cannot save images")


class Builder:
    """Builds recipes; nested recipes with the same steps are built once per builder."""

    def __init__(
        self,
        resolve_file: FileResolver,
        *,
        registry: NodeRegistry | None = None,
        user_loaders: Mapping[str, Callable[..., Any]] | None = None,
        verify: bool = True,
    ) -> None:
        self.resolve_file = resolve_file
        self.registry = registry
        self.user_loaders = dict(user_loaders or {})
        self.verify = verify
        self._built: dict[str, Any] = {}

    def build(self, recipe: Recipe) -> Any:
        """The object ``recipe`` selects, fingerprint checked (when the recipe has one)."""
        key = recipe.build_digest()
        if key not in self._built:
            self._built[key] = self._run(recipe)
        try:
            selected = get_path(self._built[key], recipe.select)
        except LookupError as exc:
            raise RecipeError(f"{recipe.name()}: cannot select {recipe.select!r}: {exc}") from None
        if self.verify and recipe.fingerprint is not None:
            actual = fingerprint(selected)
            if actual != recipe.fingerprint:
                raise FingerprintMismatch(recipe.name(), recipe.fingerprint, actual)
        return selected

    def _run(self, recipe: Recipe) -> Any:
        value: Any = None
        for number, step in enumerate(recipe.steps):
            spec = OPS.get(step.op)
            if spec is None:
                raise RecipeError(f"{recipe.name()}: step {number} has the unknown operation {step.op!r}")
            try:
                if spec.kind == "loader":
                    value = self._load(step, spec.method)
                else:
                    self._mutate(get_path(value, step.on or ""), step, spec.method)
                own_weights(value)
            except (RecipeError, LookupError) as exc:
                raise RecipeError(f"{recipe.name()}: step {number} ({step.op}) failed: {exc}") from exc
        return value

    def _decode(self, value: Any, key: str | None = None) -> Any:
        """A frozen step argument as the call gets it: files as local paths, recipes built."""
        if isinstance(value, FileRef):
            return str(self.resolve_file(value))
        if isinstance(value, Recipe):
            return self.build(value)
        if key in _DTYPE_KEYWORDS and isinstance(value, str):
            if value not in ALLOWED_DTYPES:
                raise RecipeError(f"unknown dtype {value!r}")
            return ALLOWED_DTYPES[value]
        if isinstance(value, tuple):
            return [self._decode(item) for item in value]
        if isinstance(value, Mapping):
            return {name: self._decode(item, name) for name, item in value.items()}
        return value

    def _call_arguments(self, step: Step) -> tuple[list[Any], dict[str, Any]]:
        args = [self._decode(value) for value in step.args]
        if step.file is not None:
            args.insert(0, str(self.resolve_file(step.file)))
        kwargs = {key: self._decode(value, key) for key, value in step.kwargs.items()}
        return args, kwargs

    def _load(self, step: Step, method: str) -> Any:
        if step.op == "comfy.node":
            return self._run_node(step)
        if step.op == "user.loader":
            function = self.user_loaders.get(step.cls or "")
            if function is None:
                raise RecipeError(f"the loader {step.cls!r} is not among the loaders this machine allows")
            args, kwargs = self._call_arguments(step)
            return function(*args, **kwargs)
        if step.op == "safetensors.load_file":
            from safetensors.torch import load_file

            args, kwargs = self._call_arguments(step)
            return load_file(*args, **kwargs)
        library = step.op.partition(".")[0]
        cls = allowed_class(library, step.cls)
        args, kwargs = self._call_arguments(step)
        return getattr(cls, method)(*args, **kwargs)

    def _mutate(self, target: Any, step: Step, method: str) -> None:
        args, kwargs = self._call_arguments(step)
        if step.op == "torch.to":
            target.to(kwargs["dtype"])
        elif step.op == "set":
            name = str(kwargs["name"])
            components = getattr(target, "components", None)
            if not isinstance(components, Mapping) or name not in components:
                raise RecipeError(f"'set' may only swap a pipeline component, not {name!r}")
            setattr(target, name, kwargs.get("value"))
        else:
            bound = getattr(target, method, None)
            if bound is None:
                raise RecipeError(f"{type(target).__name__} has no method {method!r}")
            bound(*args, **kwargs)

    def _run_node(self, step: Step) -> tuple[Any, ...]:
        if self.registry is None:
            raise RecipeError("a graph recipe needs the node registry")
        if step.cls not in self.registry:
            raise RecipeError(f"unknown node class {step.cls!r}")
        node_class = self.registry[step.cls]
        if not node_class.is_loader:
            raise RecipeError(f"{step.cls} is not a loader node and cannot appear in a recipe")
        files: dict[tuple[str, str], Path] = {}
        inputs: dict[str, Any] = {}
        for name, value in step.kwargs.items():
            if isinstance(value, FileRef):
                ref = value
                spec = node_class.input(name)
                folder = spec.model_folder if spec is not None and spec.model_folder else ""
                files[(folder, ref.name)] = self.resolve_file(ref)
                inputs[name] = ref.name
            else:
                inputs[name] = self._decode(value, name)
        outputs = node_class.function(_RecipeNodeContext(step.cls, files), **inputs)
        return tuple(outputs)


def build(
    recipe: Recipe,
    resolve_file: FileResolver,
    *,
    registry: NodeRegistry | None = None,
    user_loaders: Mapping[str, Callable[..., Any]] | None = None,
    verify: bool = True,
) -> Any:
    """Build the object ``recipe`` describes from local files; RecipeError/FingerprintMismatch on failure.

    ``registry`` is needed for graph recipes (engine loader nodes);
    ``user_loaders`` maps ``module:qualname`` to the ``@loader`` functions this
    machine allows.
    """
    return Builder(resolve_file, registry=registry, user_loaders=user_loaders, verify=verify).build(recipe)


def store_resolver(store: Any) -> FileResolver:
    """A resolver over an engine ModelStore: by sha256 first (with the name as a hint), then by name."""

    def resolve(ref: FileRef) -> Path:
        try:
            return store.find(sha256=ref.sha256, name=ref.name, folder=ref.folder, size=ref.bytes)
        except DiffsplitError:
            if ref.folder is None:
                raise
            return store.find(sha256=ref.sha256, name=ref.name, size=ref.bytes)

    return resolve
