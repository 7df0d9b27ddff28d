"""The operations a recipe may contain, and for each the arguments it may carry.

Nothing outside :data:`OPS` is ever executed when a recipe is rebuilt, and a
step may only carry the arguments its :class:`OpSpec` declares: every keyword
is on the op's allowlist with a value of the declared kind (:class:`ArgRule`),
and every file is a store reference (:class:`~diffsplit.tracer.recipe.FileRef`)
that the rebuilding machine resolves in its own store. A plain string never
stands where a loader would read a path. ``engine.recipe_checks`` enforces
these declarations before any step runs; ``engine.rebuild`` adds
:attr:`OpSpec.forced` keywords to every call (never taken from the recipe).

Keywords that are refused whatever their value (they download, run code
shipped with a model, unpickle weights, or write outside the store) are in
:data:`REFUSED_KWARGS`, with the reason the refusal names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

ValueKind = Literal[
    "dtype",
    "plain_name",
    "names",
    "weights_file_name",
    "variant",
    "true",
    "bool",
    "number",
    "int",
    "choice",
    "device",
    "data",
    "config",
    "model",
    "file",
]
#: Where a step's file comes from: no file, a store reference in ``file``, or either that or a nested
#: recipe as the first argument (a state dict built by ``safetensors.load_file``).
FileSource = Literal["none", "file", "file_or_model"]
#: How keywords beyond the allowlist are judged: refused, or allowed when they name a parameter of the
#: class's ``__init__`` (pipeline components as nested recipes, pipeline options and scheduler config).
InitKwargs = Literal["none", "class_init"]

#: The only weights format a diffusers or transformers call may read from a recipe.
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)


@dataclass(frozen=True)
class ArgRule:
    """What one argument may hold.

    Kinds: ``dtype`` (a dtype name), ``plain_name`` (one path segment: no ``/``,
    ``\\``, ``..``), ``names`` (a plain name or a list of them),
    ``weights_file_name`` (a plain ``.safetensors`` file name inside the
    referenced folder), ``variant`` (letters, digits, ``_ -``), ``true``
    (exactly true), ``bool``, ``number``, ``int``, ``choice`` (one of
    ``choices``), ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``), ``data``
    (plain JSON data with no files, recipes or path-like strings), ``config``
    (``data`` that is a mapping), ``model`` (a nested recipe), ``file`` (a store
    reference; a single file must end in one of ``suffixes`` when given).
    ``nullable`` also allows None.
    """

    kind: ValueKind
    choices: tuple[Any, ...] = ()
    suffixes: tuple[str, ...] = ()
    nullable: bool = False


@dataclass(frozen=True)
class OpSpec:
    """What a recipe operation does when rebuilt, and which arguments it may carry.

    ``file`` says where its file comes from and ``file_rule`` what it may be;
    ``args`` are the positional arguments it may take after the file (in
    order, each optional); ``kwargs`` the allowed keywords; ``required`` the
    keywords it must have; ``bases`` limits the class to subclasses of these
    (by class name); ``forced`` keywords are added to every call.
    """

    kind: Literal["loader", "mutator"]
    library: str
    method: str
    file: FileSource = "none"
    file_rule: ArgRule = ArgRule("file")
    args: tuple[ArgRule, ...] = ()
    kwargs: Mapping[str, ArgRule] = field(default_factory=lambda: MappingProxyType({}))
    required: frozenset[str] = frozenset()
    init_kwargs: InitKwargs = "none"
    bases: frozenset[str] | None = None
    forced: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


_DOWNLOADS = "it makes the loader download from the hub; a recipe loads only files in the worker's store"
_CODE = "it makes the loader import and run Python code shipped with a model"
_PICKLE = "it loads pickled weights, which can run code; only .safetensors weights are read"
_OUTSIDE = "it makes the loader read or write files outside the worker's store"

#: Keywords refused whatever their value, with the reason.
REFUSED_KWARGS: Mapping[str, str] = MappingProxyType(
    {
        "custom_pipeline": _CODE,
        "custom_revision": _CODE,
        "trust_remote_code": _CODE,
        "code_revision": _CODE,
        "cache_dir": _OUTSIDE,
        "offload_folder": _OUTSIDE,
        "offload_state_dict": _OUTSIDE,
        "dduf_file": _OUTSIDE,
        "gguf_file": _OUTSIDE,
        "original_config_file": _OUTSIDE,
        "revision": _DOWNLOADS,
        "token": _DOWNLOADS,
        "use_auth_token": _DOWNLOADS,
        "hf_token": _DOWNLOADS,
        "proxies": _DOWNLOADS,
        "force_download": _DOWNLOADS,
        "resume_download": _DOWNLOADS,
        "mirror": _DOWNLOADS,
        "from_flax": _PICKLE,
        "from_tf": _PICKLE,
        "weights_only": _PICKLE,
        "use_onnx": _CODE,
        "provider": _CODE,
        "sess_options": _CODE,
        "quantization_config": "quantized loading is not supported from recipes",
        "device_map": "the worker places weights itself",
        "max_memory": "the worker places weights itself",
    }
)

_DTYPE = ArgRule("dtype")
_NAME = ArgRule("plain_name")
_TRUE = ArgRule("true")
_BOOL = ArgRule("bool")
_NAMES = ArgRule("names")
_WEIGHTS_FILE = ArgRule("file", suffixes=SAFETENSORS_SUFFIXES)
#: Keywords every diffusers/transformers loader may carry: how it loads, never from where.
_LOADING = MappingProxyType(
    {
        "torch_dtype": _DTYPE,
        "dtype": _DTYPE,
        "variant": ArgRule("variant"),
        "subfolder": _NAME,
        "use_safetensors": _TRUE,
        "local_files_only": _TRUE,
        "low_cpu_mem_usage": _BOOL,
    }
)
#: Added to every diffusers/transformers load: no hub access, no pickled weights.
_SAFE_LOADING = MappingProxyType({"local_files_only": True, "use_safetensors": True})
#: The keywords of the LoRA and textual-inversion loaders (the file comes as a store reference).
_ADAPTER_FILE = MappingProxyType(
    {
        "weight_name": ArgRule("weights_file_name"),
        "subfolder": _NAME,
        "use_safetensors": _TRUE,
        "local_files_only": _TRUE,
        "low_cpu_mem_usage": _BOOL,
    }
)
_LORA_LOADING = MappingProxyType({**_ADAPTER_FILE, "adapter_name": _NAME, "hotswap": _BOOL})


def _mutator(method: str, kwargs: Mapping[str, ArgRule] | None = None, **more: Any) -> OpSpec:
    return OpSpec("mutator", "diffusers", method, kwargs=MappingProxyType(dict(kwargs or {})), **more)


def _adapter_loader(method: str, kwargs: Mapping[str, ArgRule]) -> OpSpec:
    return _mutator(method, kwargs, file="file_or_model", file_rule=_WEIGHTS_FILE, forced=_SAFE_LOADING)


#: The op that loads a pipeline's LoRA file into its UNet alone (see :data:`OPS`).
PIPELINE_LORA_OP = "diffusers.pipeline_lora_into_unet"

#: Every operation a recipe may contain, with its allowed arguments. Nothing else is ever executed.
OPS: Mapping[str, OpSpec] = MappingProxyType(
    {
        # Pipelines, models and schedulers from a diffusers folder in the store. Keywords naming a
        # parameter of the class's __init__ are pipeline components (nested recipes or None), pipeline
        # options (plain numbers/booleans) or scheduler config values (plain data).
        "diffusers.from_pretrained": OpSpec(
            "loader", "diffusers", "from_pretrained", file="file", file_rule=_WEIGHTS_FILE,
            kwargs=_LOADING, init_kwargs="class_init", forced=_SAFE_LOADING,
        ),
        # A single .safetensors checkpoint; its config folder and original LDM config are store files too.
        "diffusers.from_single_file": OpSpec(
            "loader", "diffusers", "from_single_file", file="file", file_rule=_WEIGHTS_FILE,
            kwargs=MappingProxyType({
                **_LOADING,
                "config": ArgRule("file"),
                "original_config": ArgRule("file", suffixes=(".yaml",)),
            }),
            init_kwargs="class_init", forced=MappingProxyType({"local_files_only": True}),
        ),
        # A scheduler from a config mapping (never a path: from_config would load a string as one).
        "diffusers.from_config": OpSpec(
            "loader", "diffusers", "from_config", args=(ArgRule("config"),),
            kwargs=MappingProxyType({"config": ArgRule("config")}), init_kwargs="class_init",
            bases=frozenset({"SchedulerMixin"}),
        ),
        # transformers models and tokenizers from a folder in the store.
        "transformers.from_pretrained": OpSpec(
            "loader", "transformers", "from_pretrained", file="file", file_rule=_WEIGHTS_FILE,
            kwargs=MappingProxyType({
                **_LOADING,
                "attn_implementation": ArgRule("choice", choices=("eager", "sdpa")),
                "model_max_length": ArgRule("int"),
                "padding_side": ArgRule("choice", choices=("left", "right")),
                "truncation_side": ArgRule("choice", choices=("left", "right")),
            }),
            forced=_SAFE_LOADING,
        ),
        "safetensors.load_file": OpSpec(
            "loader", "safetensors", "load_file", file="file",
            kwargs=MappingProxyType({"device": ArgRule("device")}),
        ),
        # Engine loader nodes: inputs are checked against the node's declared inputs instead.
        "comfy.node": OpSpec("loader", "engine", "node"),
        # @loader functions: run only where the machine's owner passes them in (a worker never does).
        "user.loader": OpSpec("loader", "user", "call"),
        "torch.to": OpSpec("mutator", "torch", "to", kwargs=MappingProxyType({"dtype": _DTYPE}),
                           required=frozenset({"dtype"})),
        "set": OpSpec(
            "mutator", "diffsplit", "setattr",
            kwargs=MappingProxyType({"name": _NAME, "value": ArgRule("model", nullable=True)}),
            required=frozenset({"name", "value"}),
        ),
        "diffusers.load_lora_weights": _adapter_loader("load_lora_weights", _LORA_LOADING),
        # A pipeline's LoRA loading for its UNet alone, on a UNet built without the pipeline: the pipeline
        # class (``cls``) reads and converts the file (``lora_state_dict``) and loads the UNet's part
        # (``load_lora_into_unet``), as its ``load_lora_weights`` does; the text encoders' part is left out.
        PIPELINE_LORA_OP: OpSpec(
            "mutator", "diffusers", "load_lora_into_unet", file="file", file_rule=_WEIGHTS_FILE,
            kwargs=_LORA_LOADING, bases=frozenset({"DiffusionPipeline"}), forced=_SAFE_LOADING,
        ),
        "diffusers.load_lora_adapter": _adapter_loader(
            "load_lora_adapter", {**_LORA_LOADING, "prefix": ArgRule("plain_name", nullable=True)}
        ),
        "diffusers.load_textual_inversion": _adapter_loader(
            "load_textual_inversion", {**_ADAPTER_FILE, "token": ArgRule("names", nullable=True)}
        ),
        "diffusers.fuse_lora": _mutator("fuse_lora", {
            "components": _NAMES, "lora_scale": ArgRule("number"), "safe_fusing": _BOOL,
            "adapter_names": ArgRule("names", nullable=True),
        }),
        "diffusers.unfuse_lora": _mutator("unfuse_lora", {"components": _NAMES}),
        "diffusers.set_adapters": _mutator("set_adapters", {
            "adapter_names": _NAMES, "adapter_weights": ArgRule("data", nullable=True),
            "weights": ArgRule("data", nullable=True),
        }),
        "diffusers.unload_lora_weights": _mutator(
            "unload_lora_weights", {"reset_to_overwritten_params": _BOOL}
        ),
        "diffusers.delete_adapters": _mutator("delete_adapters", {"adapter_names": _NAMES}),
        "diffusers.enable_lora": _mutator("enable_lora"),
        "diffusers.disable_lora": _mutator("disable_lora"),
        "diffusers.unload_lora": _mutator("unload_lora"),
        "diffusers.set_adapter": _mutator("set_adapter", {"adapter_name": _NAMES}),
        "diffusers.enable_adapters": _mutator("enable_adapters"),
        "diffusers.disable_adapters": _mutator("disable_adapters"),
        "diffusers.unload_textual_inversion": _mutator(
            "unload_textual_inversion", {"tokens": ArgRule("names", nullable=True)}
        ),
    }
)  # fmt: skip
