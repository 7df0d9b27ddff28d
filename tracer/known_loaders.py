"""The library functions the tracer records, named (not imported) until tracing starts.

Each :class:`KnownFunction` names a function by ``"module:Qualified.name"``
(``"module:*.name"`` = that method on every class of the module that defines
it), the recipe operation it becomes, and which of its arguments is the file
it reads and which is the object it acts on. :func:`resolve_known_functions`
imports the modules that are importable, sees through decorators
(``__wrapped__``, classmethods) and returns the code objects the recorder
watches. Libraries that are not installed are skipped.

Operations (the allowlist that ``engine.rebuild`` executes, with the arguments each may
carry) are in :data:`diffsplit.tracer.ops.OPS`, re-exported here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import CodeType, MappingProxyType
from typing import Any, Literal

import torch
from diffsplit.tracer.file_reads import NATIVE_READERS
from diffsplit.tracer.ops import OPS, OpSpec

__all__ = ["OPS", "CallKind", "KnownFunction", "OpSpec", "ResolvedFunction", "Role"]

CallKind = Literal["loader", "mutator", "placement"]
Role = Literal["call", "node"]


#: Keyword arguments that change where or how a model loads, never what it is.
NON_IDENTITY_KWARGS: frozenset[str] = frozenset(
    {
        "cache_dir",
        "force_download",
        "local_files_only",
        "proxies",
        "token",
        "use_auth_token",
        "resume_download",
        "low_cpu_mem_usage",
        "device_map",
        "max_memory",
        "offload_folder",
        "offload_state_dict",
        "output_loading_info",
        "mirror",
        "disable_mmap",
        "device",
        "backend",
        "non_blocking",
        "silence_dtype_warnings",
        "_commit_hash",
    }
)


@dataclass(frozen=True)
class KnownFunction:
    """A library function that loads or changes a model, and how to record it.

    ``file_param`` is the argument naming the file or folder read;
    ``owner_param`` the class argument of a classmethod (its name becomes the
    step's ``cls``); ``subject_param`` the object a mutator changes.
    ``classify`` refines the kind per call (``"dtype_change"``: a mutator only
    when a dtype is given; ``"scheduler_only"``: a loader only for scheduler
    classes; ``"half"`` etc.: a fixed dtype conversion). ``identity_kwargs``
    keeps arguments whose names are otherwise dropped as non-identity
    (``load_textual_inversion``'s ``token`` is the placeholder word, not a
    hub credential).
    """

    target: str
    op: str
    kind: CallKind
    file_param: str | None = None
    owner_param: str | None = None
    subject_param: str | None = None
    classify: str | None = None
    identity_kwargs: frozenset[str] = frozenset()


def _loader(target: str, op: str, file_param: str | None = None) -> KnownFunction:
    return KnownFunction(target, op, "loader", file_param, owner_param="cls")


def _mutators(
    module: str, owner: str, methods: Iterable[str], file_param: str | None = None
) -> list[KnownFunction]:
    return [
        KnownFunction(f"{module}:{owner}.{m}", f"diffusers.{m}", "mutator", file_param, subject_param="self")
        for m in methods
    ]


def _conversions(owner: str, classified: Mapping[str, str | None]) -> list[KnownFunction]:
    """``to``/``half``/``float``… of ``owner``: dtype changes are mutators, device moves placements."""
    return [
        KnownFunction(f"{owner}.{method}", "torch.to", "placement", subject_param="self", classify=classify)
        for method, classify in classified.items()
    ]


_PRETRAINED = "pretrained_model_name_or_path"
_LORA_FILE = "pretrained_model_name_or_path_or_dict"
_LORA_METHODS_OF_PIPELINES = (
    "fuse_lora",
    "unfuse_lora",
    "set_adapters",
    "unload_lora_weights",
    "delete_adapters",
    "enable_lora",
    "disable_lora",
)
_ADAPTER_METHODS_OF_MODELS = (
    "set_adapters",
    "fuse_lora",
    "unfuse_lora",
    "delete_adapters",
    "enable_lora",
    "disable_lora",
    "unload_lora",
    "set_adapter",
    "enable_adapters",
    "disable_adapters",
)
_MODULE_CONVERSIONS = MappingProxyType(
    {"to": "dtype_change", "half": "float16", "float": "float32", "bfloat16": "bfloat16", "double": "float64",
     "cuda": None, "cpu": None}
)  # fmt: skip

_PIPELINES = "diffusers.pipelines.pipeline_utils:DiffusionPipeline"
_MODELS = "diffusers.models.modeling_utils:ModelMixin"
_TRANSFORMERS = "transformers.modeling_utils:PreTrainedModel"
_INVERSION = ("diffusers.loaders.textual_inversion", "TextualInversionLoaderMixin")
_MODEL_CONVERSIONS = MappingProxyType({"to": "dtype_change", "half": "float16", "float": "float32"})

KNOWN_FUNCTIONS: tuple[KnownFunction, ...] = (
    _loader(f"{_PIPELINES}.from_pretrained", "diffusers.from_pretrained", _PRETRAINED),
    _loader(f"{_MODELS}.from_pretrained", "diffusers.from_pretrained", _PRETRAINED),
    _loader("diffusers.schedulers.scheduling_utils:SchedulerMixin.from_pretrained",
            "diffusers.from_pretrained", _PRETRAINED),
    KnownFunction("diffusers.configuration_utils:ConfigMixin.from_config", "diffusers.from_config", "loader",
                  owner_param="cls", classify="scheduler_only"),
    _loader("diffusers.loaders.single_file:FromSingleFileMixin.from_single_file",
            "diffusers.from_single_file", "pretrained_model_link_or_path"),
    _loader("diffusers.loaders.single_file_model:FromOriginalModelMixin.from_single_file",
            "diffusers.from_single_file", "pretrained_model_link_or_path_or_dict"),
    _loader(f"{_TRANSFORMERS}.from_pretrained", "transformers.from_pretrained", _PRETRAINED),
    _loader("transformers.tokenization_utils_base:PreTrainedTokenizerBase.from_pretrained",
            "transformers.from_pretrained", _PRETRAINED),
    KnownFunction("safetensors.torch:load_file", "safetensors.load_file", "loader", "filename"),
    *_mutators("diffusers.loaders.lora_pipeline", "*", ("load_lora_weights",), _LORA_FILE),
    *_mutators("diffusers.loaders.lora_pipeline", "*", ("fuse_lora", "unfuse_lora")),
    *_mutators("diffusers.loaders.lora_base", "LoraBaseMixin", ("load_lora_weights",), _LORA_FILE),
    *_mutators("diffusers.loaders.lora_base", "LoraBaseMixin", _LORA_METHODS_OF_PIPELINES),
    *_mutators("diffusers.loaders.peft", "PeftAdapterMixin", ("load_lora_adapter",), _LORA_FILE),
    *_mutators("diffusers.loaders.peft", "PeftAdapterMixin", _ADAPTER_METHODS_OF_MODELS),
    KnownFunction(f"{_INVERSION[0]}:{_INVERSION[1]}.load_textual_inversion",
                  "diffusers.load_textual_inversion", "mutator", _PRETRAINED, subject_param="self",
                  identity_kwargs=frozenset({"token"})),
    *_mutators(*_INVERSION, ("unload_textual_inversion",)),
    *_conversions(_PIPELINES, {"to": "dtype_change"}),
    *_conversions(_MODELS, _MODEL_CONVERSIONS),
    *_conversions(_TRANSFORMERS, _MODEL_CONVERSIONS),
    *_conversions("torch.nn.modules.module:Module", _MODULE_CONVERSIONS),
)  # fmt: skip

#: The tracer's own entry points for ``@loader`` functions and ``@node`` steps.
MARK_FUNCTIONS: tuple[tuple[str, Role], ...] = (
    ("diffsplit.tracer.marks:run_loader", "call"),
    ("diffsplit.tracer.marks:run_node", "node"),
)


@dataclass(frozen=True)
class ResolvedFunction:
    """A known function found in the running interpreter: its code object and parameters."""

    spec: KnownFunction
    qualname: str
    code: CodeType
    parameters: tuple[str, ...]
    varargs: str | None
    varkw: str | None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    role: Role = "call"

    def arguments(self, frame_locals: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments, from its frame's locals at the call event (containers copied)."""
        names = (*self.parameters, *(n for n in (self.varargs, self.varkw) if n))
        return {name: _copied(frame_locals[name]) for name in names if name in frame_locals}


def _copied(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


def _unwrap(raw: Any) -> Callable[..., Any] | None:
    function = raw.__func__ if isinstance(raw, classmethod | staticmethod) else raw
    function = inspect.unwrap(function) if callable(function) else None
    return function if function is not None and hasattr(function, "__code__") else None


def describe_function(
    function: Callable[..., Any], spec: KnownFunction, qualname: str, role: Role = "call"
) -> ResolvedFunction:
    """The :class:`ResolvedFunction` of a plain function (its code object and parameters)."""
    code = function.__code__
    signature = inspect.signature(function)
    parameters, defaults = [], {}
    varargs = varkw = None
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            varargs = param.name
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            varkw = param.name
        else:
            parameters.append(param.name)
            if param.default is not inspect.Parameter.empty:
                defaults[param.name] = param.default
    return ResolvedFunction(
        spec, qualname, code, tuple(parameters), varargs, varkw, MappingProxyType(defaults), role
    )


def _targets(spec_target: str) -> Iterable[tuple[str, Any]]:
    """(qualified name, raw attribute) pairs for a target; nothing when the module is missing."""
    module_name, _, path = spec_target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    owner_name, _, attribute = path.rpartition(".")
    if not owner_name:
        if attribute in vars(module):
            yield path, vars(module)[attribute]
        return
    if owner_name == "*":
        owners = [value for value in vars(module).values() if isinstance(value, type)]
        owners = [owner for owner in owners if owner.__module__ == module.__name__]
    else:
        owner = getattr(module, owner_name, None)
        owners = [owner] if isinstance(owner, type) else []
    for owner in owners:
        if attribute in vars(owner):
            yield f"{owner.__name__}.{attribute}", vars(owner)[attribute]


def resolve_known_functions(
    specs: Iterable[KnownFunction] = KNOWN_FUNCTIONS,
) -> dict[CodeType, ResolvedFunction]:
    """The code objects to watch, for every known function that is importable."""
    watched: dict[CodeType, ResolvedFunction] = {}
    for spec in specs:
        for qualname, raw in _targets(spec.target):
            function = _unwrap(raw)
            if function is not None and function.__code__ not in watched:
                watched[function.__code__] = describe_function(function, spec, qualname, "call")
    for target, role in MARK_FUNCTIONS:
        for qualname, raw in _targets(target):
            function = _unwrap(raw)
            if function is not None:
                spec = KnownFunction(target, "user.loader" if role == "call" else "node", "loader")
                watched[function.__code__] = describe_function(function, spec, qualname, role)
    return watched


def resolve_native_readers(readers: Mapping[str, str] = NATIVE_READERS) -> dict[CodeType, str]:
    """The code objects of the importable native file readers, each with its file argument's name."""
    found: dict[CodeType, str] = {}
    for target, parameter in readers.items():
        for _, raw in _targets(target):
            function = _unwrap(raw)
            if function is not None and parameter in inspect.signature(function).parameters:
                found[function.__code__] = parameter
    return found


def _dtype_argument(arguments: Mapping[str, Any]) -> torch.dtype | None:
    args = arguments.get("args", ())
    kwargs = arguments.get("kwargs", {})
    for value in (*args, kwargs.get("dtype"), kwargs.get("torch_dtype")):
        if isinstance(value, torch.dtype):
            return value
    return None


_FIXED_DTYPES = MappingProxyType(
    {
        "float16": torch.float16,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
)


def classify_call(
    resolved: ResolvedFunction, arguments: Mapping[str, Any]
) -> tuple[CallKind, dict[str, Any]] | None:
    """The kind of this call and extra step keywords, or None when it is not worth recording.

    ``Module.to("cuda")`` is a placement (no step; the tracer only notes that
    tensors moved), ``Module.to(torch.float16)`` a mutator with ``dtype``; a
    ``from_config`` that builds a randomly initialized model is not a loader.
    """
    spec = resolved.spec
    if spec.classify is None:
        return spec.kind, {}
    if spec.classify == "dtype_change":
        dtype = _dtype_argument(arguments)
        return ("mutator", {"dtype": dtype}) if dtype is not None else ("placement", {})
    if spec.classify == "scheduler_only":
        owner = arguments.get(spec.owner_param or "cls")
        bases = {base.__name__ for base in getattr(owner, "__mro__", ())}
        return (spec.kind, {}) if "SchedulerMixin" in bases else None
    return "mutator", {"dtype": _FIXED_DTYPES[spec.classify]}
