"""Single-file checkpoints (LDM/ComfyUI key layout) to and from diffusers/transformers modules.

Supported: SD 1.x, SDXL base and SDXL refiner checkpoints; standalone VAE and
ControlNet files (LDM keys, or diffusers keys on load). Configs come from the
weight shapes (:mod:`infer_config`), key names from the per-architecture rule
tables (``ldm_unet``, ``ldm_vae``, ``ldm_text``, ``ldm_controlnet``) used in both
directions. Modules are built on the meta device and given the file's tensors
without copies (``load_state_dict(assign=True)``), converted to ``dtype``,
frozen in eval mode.

Checkpoint key prefixes:

- SD 1.x: ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.`` (CLIP-L)
- SDXL: the same UNet/VAE prefixes, ``conditioner.embedders.0.transformer.`` (CLIP-L) and
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG)
- SDXL refiner: ``conditioner.embedders.0.model.`` (OpenCLIP bigG) only
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from diffsplit.engine.dtypes import ModelKind
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models import infer_config as infer
from diffsplit.engine.models import ldm_controlnet, ldm_vae
from diffsplit.engine.models.ldm_controlnet import LDM_CONTROLNET_PREFIX, controlnet_key_rules
from diffsplit.engine.models.ldm_keys import (
    KeyRule,
    TensorFile,
    Transform,
    assemble_module,
    build_on_meta,
    ldm_shapes_of,
    missing_message,
    open_tensor_file,
    read_module_state,
    same_rules,
)
from diffsplit.engine.models.ldm_text import clip_l_key_rules, open_clip_key_rules
from diffsplit.engine.models.ldm_unet import unet_key_rules
from diffsplit.engine.models.ldm_vae import LDM_VAE_PREFIX, vae_key_rules
from diffsplit.engine.models.safetensors_io import PendingTensor, write_safetensors
from diffsplit.engine.models.t2i_adapter import is_t2i_adapter, load_t2i_adapter
from diffsplit.engine.types import ControlNet, DiffusionModel, ModelFamily, ModelSampling, TextEncoders, Vae
from diffsplit.tracer.fingerprint import SampledTensor, sample_positions
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
#: ComfyUI's marker key for v-prediction checkpoints.
V_PRED_KEY = "v_pred"
SAMPLING_COMPONENT = "sampling"
RuleBuilder = Callable[[Iterable[str]], tuple[KeyRule, ...]]


@dataclass(frozen=True, eq=False)
class CheckpointParts:
    """What a checkpoint loader yields: ComfyUI's MODEL, CLIP and VAE."""

    model: DiffusionModel
    clip: TextEncoders
    vae: Vae


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder lives in a checkpoint; ``kind`` also names its tokenizer."""

    kind: Literal["clip_l", "clip_g"]
    prefix: str


def text_slots(family: ModelFamily) -> tuple[TextSlot, ...]:
    """The text encoders of ``family``, in TextEncoders order."""
    if family == "sd15":
        return (TextSlot("clip_l", "cond_stage_model.transformer."),)
    if family == "sdxl":
        return (
            TextSlot("clip_l", "conditioner.embedders.0.transformer."),
            TextSlot("clip_g", "conditioner.embedders.1.model."),
        )
    return (TextSlot("clip_g", "conditioner.embedders.0.model."),)


def detect_family(state_dict_keys_and_shapes: Mapping[str, Sequence[int]]) -> ModelFamily:
    """sd15, sdxl or sdxl_refiner from a checkpoint's keys; ModelFileError for anything else."""
    keys = state_dict_keys_and_shapes

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(UNET_PREFIX):
        raise ModelFileError(f"unknown architecture: no UNet weights ('{UNET_PREFIX}*')")
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has("cond_stage_model.transformer."):
        return "sd15"
    raise ModelFileError("unknown architecture: no SD 1.x / SDXL / SDXL refiner text encoder keys")


def _strip(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Prefix inference errors with the file and the component being read."""
    try:
        yield
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {what}: {error}") from error


def _text_parts(kind: str) -> tuple[type, RuleBuilder]:
    if kind == "clip_l":
        return CLIPTextModel, clip_l_key_rules
    return CLIPTextModelWithProjection, open_clip_key_rules


def _clip_fields(kind: str) -> tuple[str, ...]:
    # CLIPTextModel has no projection, so its projection_dim changes nothing.
    return tuple(f for f in infer.CLIP_CONFIG_FIELDS if kind == "clip_g" or f != "projection_dim")


def infer_checkpoint_configs(
    shapes: Mapping[str, tuple[int, ...]], family: ModelFamily, path: Path
) -> dict[str, dict[str, Any]]:
    """Configs of every component of a checkpoint, keyed unet / vae / clip_l / clip_g."""
    configs: dict[str, dict[str, Any]] = {}
    pooled_dim = None
    for slot in text_slots(family):
        with reading(path, f"text encoder '{slot.prefix}*'"):
            sub = _strip(shapes, slot.prefix)
            if slot.kind == "clip_l":
                configs["clip_l"] = infer.infer_clip_l_config(sub)
            else:
                configs["clip_g"] = infer.infer_open_clip_config(sub)
                pooled_dim = configs["clip_g"]["projection_dim"]
    with reading(path, f"UNet '{UNET_PREFIX}*'"):
        configs["unet"] = infer.infer_unet_config(_strip(shapes, UNET_PREFIX), family, pooled_dim=pooled_dim)
    with reading(path, f"VAE '{LDM_VAE_PREFIX}*'"):
        configs["vae"] = infer.infer_vae_config(_strip(shapes, LDM_VAE_PREFIX), family)
    return configs


def _meta_module(path: Path, prefix: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The module for ``prefix`` built on the meta device; ModelFileError when its config is refused."""
    try:
        return build_on_meta(factory)
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: cannot build a module for '{prefix}*': {error}") from error


def _load_module(
    source: TensorFile,
    prefix: str,
    factory: Callable[[], torch.nn.Module],
    rules_for: RuleBuilder,
    dtype: torch.dtype,
) -> torch.nn.Module:
    module = _meta_module(source.path, prefix, factory)
    rules = rules_for(module.state_dict().keys())
    return assemble_module(module, read_module_state(source, rules, prefix, dtype), source.path)


def _read_sampling(source: TensorFile) -> ModelSampling:
    text = source.metadata.get(infer.METADATA_PREFIX + SAMPLING_COMPONENT)
    if text is not None:
        try:
            return ModelSampling(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as error:
            raise ModelFileError(f"{source.path}: bad sampling metadata: {error}") from error
    if V_PRED_KEY in source.shapes:
        return ModelSampling(prediction_type="v_prediction")
    return ModelSampling()


#: The parts of a checkpoint, as CheckpointLoaderSimple returns them: MODEL, CLIP, VAE.
CheckpointPart = Literal["model", "clip", "vae"]
CHECKPOINT_PARTS: tuple[CheckpointPart, ...] = ("model", "clip", "vae")


@dataclass(frozen=True)
class _ModulePlan:
    """How one module of a checkpoint is built: its key prefix, constructor and key rules."""

    prefix: str
    factory: Callable[[], torch.nn.Module]
    rules_for: RuleBuilder


@dataclass(frozen=True)
class _CheckpointPlan:
    """What a checkpoint's header says: its family and, per part, the modules to build."""

    family: ModelFamily
    modules: Mapping[CheckpointPart, tuple[_ModulePlan, ...]]
    sampling: ModelSampling


def _plan(source: TensorFile) -> _CheckpointPlan:
    """Read the header of an open checkpoint (shapes and metadata only, no weights)."""
    path = source.path
    with reading(path, "checkpoint"):
        family = detect_family(source.shapes)
    configs = infer_checkpoint_configs(source.shapes, family, path)
    encoders = []
    for slot in text_slots(family):
        cls, rules_for = _text_parts(slot.kind)
        config = CLIPTextConfig(**{**configs[slot.kind], **infer.read_overrides(source.metadata, slot.kind)})
        encoders.append(_ModulePlan(slot.prefix, partial(cls, config), rules_for))
    unet_config = {**configs["unet"], **infer.read_overrides(source.metadata, "unet")}
    vae_config = {**configs["vae"], **infer.read_overrides(source.metadata, "vae")}
    modules: dict[CheckpointPart, tuple[_ModulePlan, ...]] = {
        "model": (_ModulePlan(UNET_PREFIX, partial(UNet2DConditionModel, **unet_config), unet_key_rules),),
        "clip": tuple(encoders),
        "vae": (_ModulePlan(LDM_VAE_PREFIX, partial(AutoencoderKL, **vae_config), vae_key_rules),),
    }
    return _CheckpointPlan(family, modules, _read_sampling(source))


def _wrap(plan: _CheckpointPlan, part: CheckpointPart, modules: Sequence[torch.nn.Module]) -> Any:
    """The engine value of one part (DiffusionModel, TextEncoders or Vae) around its modules."""
    from diffsplit.engine.models.tokenizers import clip_tokenizer

    if part == "model":
        return DiffusionModel(unet=modules[0], family=plan.family, sampling=plan.sampling)
    if part == "clip":
        tokenizers = tuple(clip_tokenizer(slot.kind) for slot in text_slots(plan.family))
        return TextEncoders(encoders=tuple(modules), tokenizers=tokenizers, family=plan.family)
    return Vae(model=modules[0], scaling_factor=float(modules[0].config.scaling_factor))


def _check_part(part: str) -> CheckpointPart:
    if part not in CHECKPOINT_PARTS:
        raise ValueError(f"unknown checkpoint part {part!r}; expected one of {', '.join(CHECKPOINT_PARTS)}")
    return part  # type: ignore[return-value]


def load_checkpoint_part(
    path: Path, part: CheckpointPart, *, dtype: torch.dtype = torch.float32, keep: torch.dtype | None = None
) -> Any:
    """One part of a checkpoint (``model``, ``clip`` or ``vae``), reading only that part's weights.

    Equal, tensor for tensor, to the same part of :func:`load_checkpoint`. ``keep``: load in that
    dtype instead where the file stores every weight of the part so (:func:`kept_dtype`).
    """
    part = _check_part(part)
    path = Path(path)
    with open_tensor_file(path) as source:
        plan = _plan(source)
        if keep is not None and keep != torch.float32:
            dtype = _kept(source, _part_prefixes(plan, part), keep, otherwise=dtype)
        modules = [_load_module(source, m.prefix, m.factory, m.rules_for, dtype) for m in plan.modules[part]]
    return _wrap(plan, part, modules)


def _part_prefixes(plan: _CheckpointPlan, part: CheckpointPart) -> tuple[str, ...]:
    return tuple(module.prefix for module in plan.modules[part])


#: The dtype policy's model kind of each checkpoint part (``engine.dtypes``).
PART_KINDS: Mapping[CheckpointPart, ModelKind] = {"model": "unet", "clip": "text_encoder", "vae": "vae"}
_FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})


def kept_dtype(path: Path, part: CheckpointPart, wanted: torch.dtype) -> torch.dtype:
    """``wanted`` where the file stores every floating weight of ``part`` in exactly that dtype, else
    float32: a worker that computes in fp16 keeps an fp16 file's weights as they are (not doubled),
    and never rounds a float32 file's weights (its fingerprint would no longer match the client's)."""
    if wanted == torch.float32:
        return wanted
    with open_tensor_file(Path(path)) as source:
        return _kept(source, _part_prefixes(_plan(source), _check_part(part)), wanted)


def kept_file_dtype(path: Path, wanted: torch.dtype) -> torch.dtype:
    """:func:`kept_dtype` for a standalone model file (a VAE, a ControlNet): all of its weights."""
    if wanted == torch.float32:
        return wanted
    with open_tensor_file(Path(path)) as source:
        return _kept(source, ("",), wanted)


def _kept(source: TensorFile, prefixes: tuple[str, ...], wanted: torch.dtype,
          otherwise: torch.dtype = torch.float32) -> torch.dtype:
    stored = {dtype for key, dtype in source.dtypes.items()
              if key.startswith(prefixes) and dtype in _FLOATING}
    return wanted if stored == {str(wanted).removeprefix("torch.")} else otherwise


def check_checkpoint(path: Path) -> ModelFamily:
    """The family of a checkpoint, from its header alone; ModelFileError for anything the loader refuses."""
    with open_tensor_file(Path(path)) as source:
        plan = _plan(source)
        for part in CHECKPOINT_PARTS:
            for module in plan.modules[part]:
                _missing_weights(source, module)
    return plan.family


def _missing_weights(source: TensorFile, module: _ModulePlan) -> None:
    meta = _meta_module(source.path, module.prefix, module.factory)
    rules = module.rules_for(meta.state_dict().keys())
    missing = [module.prefix + r.ldm_key for r in rules if module.prefix + r.ldm_key not in source.shapes]
    if missing:
        raise ModelFileError(missing_message(source.path, missing))


def checkpoint_part_fingerprint(
    path: Path, part: CheckpointPart, *, dtype: torch.dtype = torch.float32
) -> str:
    """The fingerprint :func:`load_checkpoint_part` would give, without building the part.

    The modules are built on the meta device and each tensor is read from the
    file, converted as the loader converts it, sampled and dropped: at most one
    tensor is in memory at a time.
    """
    from diffsplit.tracer.fingerprint import fingerprint

    part = _check_part(part)
    path = Path(path)
    with open_tensor_file(path) as source:
        plan = _plan(source)
        modules: list[torch.nn.Module] = []
        readers: dict[int, Callable[[], torch.Tensor]] = {}
        for module_plan in plan.modules[part]:
            module = _meta_module(path, module_plan.prefix, module_plan.factory)
            by_key = {}
            for rule in module_plan.rules_for(module.state_dict().keys()):
                for index, key in enumerate(rule.module_keys):
                    by_key[key] = (rule, index)
            for name, tensor in (*module.named_parameters(), *module.named_buffers()):
                found = by_key.get(name)
                readers[id(tensor)] = (
                    partial(_read_converted, source, module_plan.prefix, *found, dtype, tensor)
                    if found is not None else partial(_unstored_buffer, path, name, tensor)
                )
            modules.append(module)
        value = _wrap(plan, part, modules)
        return fingerprint(value, tensor_at=lambda _path, meta: readers[id(meta)]())


def _read_converted(
    source: TensorFile, prefix: str, rule: KeyRule, index: int, dtype: torch.dtype, meta: torch.Tensor
) -> torch.Tensor | SampledTensor:
    """The module tensor ``rule`` gives at ``index``, as :func:`read_module_state` would give it; from
    a safetensors file only its sampled elements (:func:`file_positions` maps them into the file)."""
    key = prefix + rule.ldm_key
    if key not in source.shapes:
        raise ModelFileError(missing_message(source.path, [key]))
    if source.read_elements is None:
        tensor = source.read(key)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return rule.to_module(tensor)[index]
    shape = tuple(meta.shape)
    positions = sample_positions(math.prod(shape))
    values = source.read_elements(key, [file_position(rule, index, shape, p) for p in positions])
    if values.is_floating_point():
        values = values.to(dtype)
    return SampledTensor(values.dtype, shape, values)


def file_position(rule: KeyRule, index: int, shape: tuple[int, ...], position: int) -> int:
    """Where flat element ``position`` of module tensor ``index`` (of ``shape``) sits in ``rule``'s
    LDM tensor, flat: the inverse of :meth:`KeyRule.to_module`, element by element."""
    if rule.transform is Transform.TRANSPOSE:  # module [rows, cols] is LDM [cols, rows] transposed
        rows, cols = shape
        row, col = divmod(position, cols)
        return col * rows + row
    if rule.transform is Transform.SPLIT_QKV:  # module tensor ``index`` is the index-th third, rows first
        return index * math.prod(shape) + position
    return position  # SAME, CONV_1X1: the same elements in the same order


def _unstored_buffer(path: Path, name: str, meta: torch.Tensor) -> torch.Tensor:
    """A non-persistent buffer the loader rebuilds (transformers CLIP's ``position_ids``)."""
    if name.rpartition(".")[2] == "position_ids":
        return torch.arange(meta.shape[-1]).expand(1, -1)
    raise ModelFileError(f"{path}: no weights for {name!r}")


def load_checkpoint(path: Path, *, dtype: torch.dtype = torch.float32) -> CheckpointParts:
    """Load an SD 1.x / SDXL / SDXL refiner single-file checkpoint (LDM keys).

    Raises ModelFileError for a missing or unreadable file, an unknown
    architecture, or missing required weights (naming the first missing keys).
    """
    path = Path(path)
    with open_tensor_file(path) as source:
        plan = _plan(source)
        built = {
            part: [_load_module(source, m.prefix, m.factory, m.rules_for, dtype) for m in plan.modules[part]]
            for part in ("clip", "model", "vae")
        }
    return CheckpointParts(
        model=_wrap(plan, "model", built["model"]),
        clip=_wrap(plan, "clip", built["clip"]),
        vae=_wrap(plan, "vae", built["vae"]),
    )


def _ldm_tensors(module: torch.nn.Module, rules_for: RuleBuilder, prefix: str) -> dict[str, PendingTensor]:
    """The module's tensors in LDM layout, each converted only when the writer asks for it."""
    state = module.state_dict()
    pending: dict[str, PendingTensor] = {}
    for rule in rules_for(state.keys()):
        parts = [state[key] for key in rule.module_keys]
        meta = rule.to_ldm([torch.empty(part.shape, dtype=part.dtype, device="meta") for part in parts])
        pending[prefix + rule.ldm_key] = PendingTensor(
            meta.dtype, tuple(meta.shape), partial(_converted, rule, parts))
    return pending


def _converted(rule: KeyRule, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return rule.to_ldm([part.detach().cpu() for part in parts]).contiguous()


def _shapes(tensors: Mapping[str, PendingTensor]) -> dict[str, tuple[int, ...]]:
    return {key: tensor.shape for key, tensor in tensors.items()}


def _vae_config(vae: Vae) -> dict[str, Any]:
    """The VAE module's config with the wrapper's scaling factor (the one callers use)."""
    return {**vae.model.config, "scaling_factor": vae.scaling_factor}


def save_checkpoint(path: Path, parts: CheckpointParts, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``parts`` as one safetensors checkpoint in the LDM layout of its family.

    Config values the loader could not infer from shapes are stored as
    ``diffsplit.*`` metadata, so ``load_checkpoint`` rebuilds identical modules.
    """
    family = parts.model.family
    slots = text_slots(family)
    if parts.clip.family != family or len(parts.clip.encoders) != len(slots):
        raise ValueError(
            f"text encoders ({parts.clip.family}, {len(parts.clip.encoders)}) do not fit {family}"
        )
    tensors = _ldm_tensors(parts.model.unet, unet_key_rules, UNET_PREFIX)
    tensors.update(_ldm_tensors(parts.vae.model, vae_key_rules, LDM_VAE_PREFIX))
    for slot, encoder in zip(slots, parts.clip.encoders, strict=True):
        tensors.update(_ldm_tensors(encoder, _text_parts(slot.kind)[1], slot.prefix))
    if parts.model.sampling.prediction_type == "v_prediction":
        tensors[V_PRED_KEY] = PendingTensor.of(torch.zeros(0))
    inferred = infer_checkpoint_configs(_shapes(tensors), family, Path(path))
    entries = dict(metadata or {})
    unet_overrides = infer.diffusers_overrides(
        UNet2DConditionModel, parts.model.unet.config, inferred["unet"]
    )
    entries.update(infer.write_overrides("unet", unet_overrides))
    vae_overrides = infer.diffusers_overrides(AutoencoderKL, _vae_config(parts.vae), inferred["vae"])
    entries.update(infer.write_overrides("vae", vae_overrides))
    for slot, encoder in zip(slots, parts.clip.encoders, strict=True):
        clip = infer.clip_overrides(encoder.config.to_dict(), inferred[slot.kind], _clip_fields(slot.kind))
        entries.update(infer.write_overrides(slot.kind, clip))
    if parts.model.sampling != ModelSampling():
        entries.update(infer.write_overrides(SAMPLING_COMPONENT, dataclasses.asdict(parts.model.sampling)))
    write_safetensors(tensors, path, metadata=entries)


@dataclass(frozen=True)
class FileLayout:
    """How a standalone VAE/ControlNet file names its keys."""

    prefix: str
    diffusers: bool


def find_layout(source: TensorFile, kind: Literal["vae", "controlnet"]) -> FileLayout:
    """LDM (bare or prefixed) or diffusers keys; ModelFileError when the file is neither."""
    if kind == "vae":
        ldm_key, diffusers_key = ldm_vae.LDM_MARKER_KEY, ldm_vae.DIFFUSERS_MARKER_KEY
        prefixes = ("", LDM_VAE_PREFIX)
    else:
        ldm_key, diffusers_key = ldm_controlnet.LDM_MARKER_KEY, ldm_controlnet.DIFFUSERS_MARKER_KEY
        prefixes = ("", LDM_CONTROLNET_PREFIX)
    for prefix in prefixes:
        if prefix + ldm_key in source.shapes:
            return FileLayout(prefix, diffusers=False)
    if diffusers_key in source.shapes:
        return FileLayout("", diffusers=True)
    raise ModelFileError(f"{source.path}: not a {kind} file (neither '{ldm_key}' nor '{diffusers_key}')")


def _standalone_shapes(source: TensorFile, prefix: str, diffusers: bool, rules_for: RuleBuilder) -> dict:
    """LDM shapes of a standalone file, converting from diffusers keys when needed."""
    if not diffusers:
        return _strip(source.shapes, prefix)
    try:
        return ldm_shapes_of(rules_for(source.shapes.keys()), source.shapes)
    except ValueError as error:
        raise ModelFileError(f"{source.path}: {error}") from error


def load_vae(path: Path, *, dtype: torch.dtype = torch.float32, scaling_factor: float | None = None) -> Vae:
    """Load a standalone VAE file (LDM keys, optionally ``first_stage_model.``-prefixed, or diffusers keys).

    The scaling factor comes from ``diffsplit.vae`` metadata, else
    ``scaling_factor``, else SD 1.x's 0.18215 (shapes cannot tell SD from SDXL VAEs).
    """
    path = Path(path)
    with open_tensor_file(path) as source:
        layout = find_layout(source, "vae")
        with reading(path, "VAE"):
            shapes = _standalone_shapes(source, layout.prefix, layout.diffusers, vae_key_rules)
            config = infer.infer_vae_config(shapes, "sd15")
        if scaling_factor is not None:
            config["scaling_factor"] = scaling_factor
        config.update(infer.read_overrides(source.metadata, "vae"))
        rules_for = same_rules if layout.diffusers else vae_key_rules
        module = _load_module(source, layout.prefix, partial(AutoencoderKL, **config), rules_for, dtype)
    return Vae(model=module, scaling_factor=float(module.config.scaling_factor))


def save_vae(path: Path, vae: Vae) -> None:
    """Write a standalone VAE file with LDM keys (ComfyUI ``vae/`` layout)."""
    tensors = _ldm_tensors(vae.model, vae_key_rules, "")
    inferred = infer.infer_vae_config(_shapes(tensors), "sd15")
    overrides = infer.diffusers_overrides(AutoencoderKL, _vae_config(vae), inferred)
    write_safetensors(tensors, path, metadata=infer.write_overrides("vae", overrides))


def load_controlnet(path: Path, *, dtype: torch.dtype = torch.float32) -> ControlNet:
    """Load a ControlNet file (LDM keys, optionally ``control_model.``-prefixed, or diffusers keys), or a
    T2I-Adapter file (``models.t2i_adapter``)."""
    path = Path(path)
    with open_tensor_file(path) as source:
        if is_t2i_adapter(source.shapes):  # ComfyUI's ControlNetLoader loads T2I-Adapters too
            with reading(path, "T2I-Adapter"):
                return ControlNet(model=load_t2i_adapter(source, dtype))
        layout = find_layout(source, "controlnet")
        with reading(path, "ControlNet"):
            shapes = _standalone_shapes(source, layout.prefix, layout.diffusers, controlnet_key_rules)
            config = infer.infer_controlnet_config(shapes)
        config.update(infer.read_overrides(source.metadata, "controlnet"))
        if config.get("addition_embed_type") and config.get("addition_time_embed_dim") is None:
            raise ModelFileError(
                f"{path}: cannot infer addition_time_embed_dim of this SDXL ControlNet "
                "(its adm_in_channels do not fit SDXL's pooled width 1280); "
                "store it as 'diffsplit.controlnet' metadata"
            )
        rules_for = same_rules if layout.diffusers else controlnet_key_rules
        module = _load_module(source, layout.prefix, partial(ControlNetModel, **config), rules_for, dtype)
    return ControlNet(model=module)


def save_controlnet(path: Path, controlnet: ControlNet) -> None:
    """Write a ControlNet file with LDM keys (no ``control_model.`` prefix)."""
    tensors = _ldm_tensors(controlnet.model, controlnet_key_rules, "")
    inferred = infer.infer_controlnet_config(_shapes(tensors))
    overrides = infer.diffusers_overrides(ControlNetModel, controlnet.model.config, inferred)
    write_safetensors(tensors, path, metadata=infer.write_overrides("controlnet", overrides))
