"""Rebuilding a model object from a recipe, on any machine, from that machine's own files.

``build(recipe, resolve_file)`` runs the recipe's steps and returns the
selected object, after checking its weight fingerprint. Before anything runs,
the whole recipe (nested recipes included) is checked against the allowlists
of ``tracer.ops.OPS`` (``engine.recipe_checks``): only those operations, with
only their declared keywords, and every file a store reference — a recipe never
carries a path. diffusers/transformers loads get ``local_files_only=True`` and
``use_safetensors=True`` (no hub access, no pickled weights, whatever the
recipe says). Error texts name files as the recipe does (``folder/name``),
never by this machine's paths. Classes are looked up by name only in the
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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.dtypes import DtypePolicy, ModelKind
from diffsplit.engine.errors import EngineError
from diffsplit.engine.folder_views import FolderViews
from diffsplit.engine.lora_metadata import check_adapter_file
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.recipe_checks import (
    ALLOWED_BASES,
    ALLOWED_DTYPES,
    RecipeChecker,
    allowed_class,
    derives_from,
)
from diffsplit.tracer.errors import FingerprintMismatch, RecipeError
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.objects import get_path, named_tensors
from diffsplit.tracer.ops import OPS, PIPELINE_LORA_OP, OpSpec
from diffsplit.tracer.owned_memory import own_weights
from diffsplit.tracer.pipeline_folders import component_class, selected_component
from diffsplit.tracer.recipe import FileRef, Recipe, Step
from diffsplit.transport.errors import DiffsplitError

__all__ = ["ALLOWED_BASES", "ALLOWED_DTYPES", "Builder", "allowed_class", "build", "store_resolver"]

FileResolver = Callable[[FileRef], Path]
_DTYPE_KEYWORDS = frozenset({"dtype", "torch_dtype"})
#: Classes whose loads read weights (``use_safetensors`` applies); tokenizers and schedulers read none.
_WEIGHT_CLASSES = ("DiffusionPipeline", "ModelMixin", "PreTrainedModel")
_SHOWN_ERROR_CHARS = 600
#: Mutators that read a LoRA file whose header may carry a peft config (``engine.lora_metadata``).
_ADAPTER_FILE_METHODS = frozenset({"load_lora_weights", "load_lora_adapter"})
#: Keywords of ``load_lora_weights`` that go to ``load_lora_into_unet``; the others read the file.
_LORA_INTO_UNET_KEYWORDS = ("adapter_name", "hotswap", "low_cpu_mem_usage")


class _RecipeNodeContext:
    """The NodeContext of a loader node rebuilt from a recipe: model files come from the recipe."""

    def __init__(self, node_id: str, files: Mapping[tuple[str, str], Path],
                 master_dtypes: DtypePolicy | None = None) -> None:
        self.node_id = node_id
        self._files = files
        #: kind → the dtype this machine keeps models in where files store them so (None: float32)
        self.master_dtype: Callable[[ModelKind], torch.dtype] | None = (
            None if master_dtypes is None else master_dtypes.of)

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
    """Builds recipes; nested recipes with the same steps are built once per builder.

    Every recipe is checked whole (:class:`~diffsplit.engine.recipe_checks.RecipeChecker`)
    before its first step runs.
    """

    def __init__(
        self,
        resolve_file: FileResolver,
        *,
        registry: NodeRegistry | None = None,
        user_loaders: Mapping[str, Callable[..., Any]] | None = None,
        verify: bool = True,
        master_dtypes: DtypePolicy | None = None,
    ) -> None:
        self.resolve_file = resolve_file
        self.registry = registry
        #: a worker computing in fp16/bf16 keeps a file's weights in that dtype when stored so
        self.master_dtypes = master_dtypes
        self.user_loaders = dict(user_loaders or {})
        self.verify = verify
        self.checker = RecipeChecker(registry)
        self._built: dict[str, Any] = {}
        #: local path → the name the recipe gave it, to keep this machine's paths out of error texts
        self._names: dict[str, str] = {}

    def check(self, recipe: Recipe) -> None:
        """Raise a RecipeError unless the whole recipe (nested ones included) is allowed; runs nothing."""
        self.checker.check(recipe)

    def build(self, recipe: Recipe) -> Any:
        """The object ``recipe`` selects, fingerprint checked (when the recipe has one)."""
        self.check(recipe)
        key = build_key(recipe, self.registry)
        if key not in self._built:
            self._built[key] = self._run(recipe)
        try:
            selected = get_path(self._built[key], recipe.select)
        except LookupError as exc:
            raise RecipeError(f"{recipe.name()}: cannot select {recipe.select!r}: {exc}") from None
        if self.verify and recipe.fingerprint is not None:
            check_fingerprint(recipe, selected)
        return selected

    def _run(self, recipe: Recipe) -> Any:
        """Run the steps of a checked recipe; loader failures become RecipeErrors without local paths.

        A graph loader whose class builds outputs alone builds only the selected one
        (:func:`part_index`): the others are None in the tuple it returns.
        """
        self.check(recipe)
        part = part_index(recipe, self.registry)
        component = pipeline_component(recipe)
        value: Any = None
        for number, step in enumerate(recipe.steps):
            spec = OPS[step.op]
            where = f"{recipe.name()}: step {number} ({step.op}) failed"
            try:
                if spec.kind == "loader" and part is not None:
                    value = self._run_node_part(step, part)
                elif spec.kind == "loader" and component is not None:
                    value = self._load_component(step, spec, component)
                elif spec.kind == "loader":
                    value = self._load(step, spec)
                else:
                    self._mutate(get_path(value, step.on or ""), step, spec)
                own_weights(value)
            except (RecipeError, LookupError) as exc:
                raise RecipeError(f"{where}: {self.scrub(str(exc))}") from exc
            except DiffsplitError as exc:
                if not isinstance(exc, EngineError):
                    raise  # the machine's own refusals (a file missing from its store, a cancelled job)
                raise RecipeError(f"{where}: {type(exc).__name__}: {self.scrub(str(exc))}") from exc
            except Exception as exc:  # a library's failure (OSError, ValueError…): reported, paths removed
                raise RecipeError(f"{where}: {type(exc).__name__}: {self.scrub(str(exc))}") from exc
        return value

    def scrub(self, text: str) -> str:
        """``text`` with every local path this builder resolved replaced by the recipe's name for it."""
        for path in sorted(self._names, key=len, reverse=True):
            text = text.replace(path, self._names[path])
        return text if len(text) <= _SHOWN_ERROR_CHARS else text[: _SHOWN_ERROR_CHARS - 1] + "…"

    def _resolve(self, ref: FileRef, suffixes: tuple[str, ...] = ()) -> Path:
        """The local file of ``ref``, remembered for :meth:`scrub`; refused when not of ``suffixes``."""
        path = Path(self.resolve_file(ref))
        for shown_path in {str(path), str(path.absolute()), str(path.resolve())}:
            self._names[shown_path] = ref.store_name
        if suffixes and not path.is_dir() and not path.name.lower().endswith(suffixes):
            raise RecipeError(
                f"{ref.store_name} is stored here as a file other than {'/'.join(suffixes)}: pickled "
                "weights are never loaded from recipes"
            )
        return path

    def _decode(self, value: Any, key: str | None = None) -> Any:
        """A frozen step argument as the call gets it: files as local paths, recipes built."""
        if isinstance(value, FileRef):
            return str(self._resolve(value))
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

    def _call_arguments(self, step: Step, spec: OpSpec | None = None) -> tuple[list[Any], dict[str, Any]]:
        args = [self._decode(value) for value in step.args]
        if step.file is not None:
            suffixes = spec.file_rule.suffixes if spec is not None else ()
            args.insert(0, str(self._resolve(step.file, suffixes)))
        kwargs = {key: self._decode(value, key) for key, value in step.kwargs.items()}
        if spec is not None:
            kwargs.update(spec.forced)
        return args, kwargs

    def _load(self, step: Step, spec: OpSpec) -> Any:
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

            args, kwargs = self._call_arguments(step, spec)
            return load_file(*args, **kwargs)
        cls = allowed_class(spec.library, step.cls, spec.bases)
        args, kwargs = self._call_arguments(step, spec)
        if not any(derives_from(cls, name) for name in _WEIGHT_CLASSES):
            kwargs.pop("use_safetensors", None)  # tokenizers and schedulers read no weights
        return getattr(cls, spec.method)(*args, **kwargs)

    def _load_component(self, step: Step, spec: OpSpec, name: str) -> dict[str, Any]:
        """One component of a diffusers pipeline folder, loaded from its subfolder as the pipeline
        loads it (``{name: component}``, so the recipe's select path finds it); the whole pipeline
        where the folder's ``model_index.json`` does not name a loadable class for it."""
        assert step.file is not None
        folder = self._resolve(step.file, spec.file_rule.suffixes)
        library, class_name = component_class(folder, name)
        if library is None:
            return {name: get_path(self._load(step, spec), name)}
        cls = allowed_class(library, class_name)
        _, given = self._call_arguments(step, spec)
        kwargs = {key: value for key, value in given.items() if key in _COMPONENT_KEYWORDS}
        if not any(derives_from(cls, base) for base in _WEIGHT_CLASSES):
            kwargs = {key: value for key, value in kwargs.items() if key == "local_files_only"}
        return {name: cls.from_pretrained(str(folder), subfolder=name, **kwargs)}

    def _mutate(self, target: Any, step: Step, spec: OpSpec) -> None:
        args, kwargs = self._call_arguments(step, spec)
        if step.op == "torch.to":
            target.to(kwargs["dtype"])
        elif step.op == PIPELINE_LORA_OP:
            self._pipeline_lora_into_unet(target, step, spec, args, kwargs)
        elif step.op == "set":
            name = str(kwargs["name"])
            components = getattr(target, "components", None)
            if not isinstance(components, Mapping) or name not in components:
                raise RecipeError(f"'set' may only swap a pipeline component, not {name!r}")
            setattr(target, name, kwargs.get("value"))
        else:
            bound = getattr(target, spec.method, None)
            if bound is None:
                raise RecipeError(f"{type(target).__name__} has no method {spec.method!r}")
            if spec.method in _ADAPTER_FILE_METHODS and step.file is not None:
                # diffusers builds a peft LoraConfig from the file's own header: data only, never code
                check_adapter_file(Path(args[0]))
            bound(*args, **kwargs)

    @staticmethod
    def _pipeline_lora_into_unet(target: Any, step: Step, spec: OpSpec, args: list[Any],
                                 kwargs: dict[str, Any]) -> None:
        """What ``pipeline.load_lora_weights(file)`` does to the pipeline's UNet, on a UNet alone."""
        pipeline = allowed_class(spec.library, step.cls, spec.bases)
        if not (hasattr(pipeline, "lora_state_dict") and hasattr(pipeline, "load_lora_into_unet")):
            raise RecipeError(f"{step.cls} loads no LoRA into a UNet")
        if len(args) != 1:
            raise RecipeError(f"{step.op} takes its LoRA file and nothing else")
        check_adapter_file(Path(args[0]))  # diffusers builds a peft LoraConfig from the file's own header
        loading = {key: kwargs.pop(key) for key in _LORA_INTO_UNET_KEYWORDS if key in kwargs}
        state_dict, network_alphas, metadata = pipeline.lora_state_dict(args[0], return_lora_metadata=True,
                                                                         **kwargs)
        if not all("lora" in key for key in state_dict):
            raise RecipeError(f"{step.op}: the file is not a LoRA (a key without 'lora' in it)")
        pipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=target,
                                     metadata=metadata, _pipeline=None, **loading)

    def _node_class(self, step: Step) -> NodeClass:
        if self.registry is None:
            raise RecipeError("a graph recipe needs the node registry")
        if step.cls not in self.registry:
            raise RecipeError(f"unknown node class {step.cls!r}")
        node_class = self.registry[step.cls]
        if not node_class.is_loader:
            raise RecipeError(f"{step.cls} is not a loader node and cannot appear in a recipe")
        return node_class

    def _run_node(self, step: Step) -> tuple[Any, ...]:
        node_class = self._node_class(step)
        context, inputs = self._node_inputs(node_class, step, None)
        return tuple(node_class.function(context, **inputs))

    def _run_node_part(self, step: Step, index: int) -> tuple[Any, ...]:
        """Output ``index`` of a loader node alone, in its place in the output tuple."""
        node_class = self._node_class(step)
        loader = node_class.output_loaders[index]
        context, inputs = self._node_inputs(node_class, step, loader.uses)
        built = loader.load(context, **inputs)
        return tuple(built if position == index else None for position in range(len(node_class.outputs)))

    def _node_inputs(
        self, node_class: NodeClass, step: Step, uses: frozenset[str] | None
    ) -> tuple[_RecipeNodeContext, dict[str, Any]]:
        """The node's context and inputs; with ``uses``, the inputs not in it are None (nothing built)."""
        files: dict[tuple[str, str], Path] = {}
        inputs: dict[str, Any] = {}
        for name, value in step.kwargs.items():
            if uses is not None and name not in uses:
                inputs[name] = None
            elif isinstance(value, FileRef):
                ref = value
                spec = node_class.input(name)
                folder = spec.model_folder if spec is not None and spec.model_folder else ""
                files[(folder, ref.name)] = self._resolve(ref)
                inputs[name] = ref.name
            else:
                inputs[name] = self._decode(value, name)
        return _RecipeNodeContext(str(step.cls), files, self.master_dtypes), inputs


def check_fingerprint(recipe: Recipe, built: Any) -> None:
    """Raise FingerprintMismatch unless ``built`` is what the recipe's fingerprint says.

    A model that keeps weights in half precision (from a file stored so: ``kept_dtype``) is also
    compared as float32 (:func:`comparable_fingerprint`, what a client keeping half weights sends):
    the conversion is exact, and loaders never keep a half dtype a file does not store, so no
    rounded weight passes.
    """
    expected = recipe.fingerprint
    if expected is None:
        return
    actual = fingerprint(built)
    if actual != expected and comparable_fingerprint(built) != expected:
        raise FingerprintMismatch(recipe.name(), expected, actual)


def comparable_fingerprint(value: Any) -> str:
    """The fingerprint a recipe carries for ``value``: as float32 where it holds half tensors."""
    halves = any(t.dtype in (torch.float16, torch.bfloat16) for _path, t in named_tensors(value))
    return fingerprint(value, as_dtype=torch.float32) if halves else fingerprint(value)


#: What a pipeline load passes on to each component's own load.
_COMPONENT_KEYWORDS = frozenset({"torch_dtype", "dtype", "variant", "low_cpu_mem_usage", "local_files_only",
                                 "use_safetensors"})


def pipeline_component(recipe: Recipe) -> str | None:
    """The component a one-step pipeline load (``diffusers.from_pretrained`` of a folder) selects,
    which the worker then builds alone from its subfolder (the UNet without the text encoder and
    VAE); None for other recipes, and where the recipe passes that component itself."""
    head = selected_component(recipe)
    if head is None:
        return None
    try:
        cls = allowed_class("diffusers", recipe.steps[0].cls)
    except RecipeError:
        return None
    return head if derives_from(cls, "DiffusionPipeline") else None


def part_index(recipe: Recipe, registry: NodeRegistry | None) -> int | None:
    """The output a one-step graph recipe selects, where its loader class builds that output alone.

    CheckpointLoaderSimple's MODEL is then built without its CLIP and VAE (``NodeClass.output_loaders``).
    """
    if registry is None or len(recipe.steps) != 1:
        return None
    step = recipe.steps[0]
    if step.op != "comfy.node" or step.cls not in registry:
        return None
    node_class = registry[step.cls]
    head = recipe.select.partition(".")[0]
    if not node_class.output_loaders or not head.isdigit() or int(head) >= len(node_class.outputs):
        return None
    return int(head)


def build_key(recipe: Recipe, registry: NodeRegistry | None) -> str:
    """What a build is cached under: the recipe's build digest, and the output when built alone.

    The worker's cache and ``status`` use it, and a client routing by held models computes the same.
    """
    part = part_index(recipe, registry)
    if part is not None:
        return f"{recipe.build_digest()}:{part}"
    component = pipeline_component(recipe)
    return recipe.build_digest() if component is None else f"{recipe.build_digest()}:{component}"


def build(
    recipe: Recipe,
    resolve_file: FileResolver,
    *,
    registry: NodeRegistry | None = None,
    user_loaders: Mapping[str, Callable[..., Any]] | None = None,
    verify: bool = True,
    master_dtypes: DtypePolicy | None = None,
) -> Any:
    """Build the object ``recipe`` describes from local files; RecipeError/FingerprintMismatch on failure.

    ``registry`` is needed for graph recipes (engine loader nodes);
    ``user_loaders`` maps ``module:qualname`` to the ``@loader`` functions this
    machine allows.
    """
    return Builder(resolve_file, registry=registry, user_loaders=user_loaders, verify=verify,
                   master_dtypes=master_dtypes).build(recipe)


def store_resolver(store: Any, views: FolderViews | None = None) -> FileResolver:
    """A resolver over an engine ModelStore: by sha256 first (with the name as a hint), then by name.

    A folder reference that lists its files is assembled from the store's files of those sha256s
    (``views``: where; default under the user cache).
    """
    folders = views if views is not None else FolderViews([store.find_file])

    def resolve(ref: FileRef) -> Path:
        if ref.files:
            return folders.view(ref)
        try:
            return store.find(sha256=ref.sha256, name=ref.name, folder=ref.folder, size=ref.bytes)
        except DiffsplitError:
            if ref.folder is None:
                raise
            return store.find(sha256=ref.sha256, name=ref.name, size=ref.bytes)

    return resolve
