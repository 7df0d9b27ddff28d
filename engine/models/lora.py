"""LoRA files: parse kohya and diffusers/peft layouts, merge into copies, save.

Two key layouts are read:

- kohya (what most ``.safetensors`` LoRAs use and ``pipe.load_lora_weights``
  accepts): ``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; text encoders as ``lora_te_`` (SD 1.x),
  ``lora_te1_`` / ``lora_te2_`` (SDXL).
- diffusers/peft: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``
  (``text_encoder.``, ``text_encoder_2.``), with ``lora_alpha`` from diffusers'
  ``lora_adapter_metadata`` when the file carries it.

Module names are kept in their flat form (dots turned into underscores) and
resolved against the real module tree when applied, so any module path works.
Applying follows ComfyUI: the result holds new modules with
``W + strength * (up @ down) * alpha / rank`` merged; unpatched tensors are
shared with the base, which is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.types import DiffusionModel, TextEncoders
from diffsplit.tracer.owned_memory import owned_tensor
from safetensors import safe_open

logger = logging.getLogger(__name__)

LoraComponent = Literal["unet", "te1", "te2"]
LoraRole = Literal["down", "up", "alpha"]

_KOHYA_PREFIXES: Mapping[str, LoraComponent] = MappingProxyType(
    {"lora_unet_": "unet", "lora_te_": "te1", "lora_te1_": "te1", "lora_te2_": "te2"}
)
_PEFT_PREFIXES: Mapping[str, LoraComponent] = MappingProxyType(
    {"unet.": "unet", "text_encoder.": "te1", "text_encoder_2.": "te2"}
)
_KOHYA_ROLES: Mapping[str, LoraRole] = MappingProxyType(
    {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
)
_PEFT_ROLES: Mapping[str, LoraRole] = MappingProxyType(
    {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
)
#: Markers of per-module tensors this module cannot merge (DoRA, LoCon mid, LoRA bias...).
_PEFT_UNSUPPORTED_MARKERS = (".lora_", ".dora_")
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_TEXT_MODEL_LEVEL = "text_model."


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One low-rank update: ``delta = up @ down * alpha / rank`` (``alpha`` None → scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        """The inner dimension of the update."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1 when the file gives no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def fits(self, weight_shape: torch.Size) -> bool:
        """Whether the update has as many elements as a weight of ``weight_shape``."""
        return self.up.shape[0] * self.down[0].numel() == weight_shape.numel()

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The float32 weight update for a weight of ``weight_shape`` (linear or conv)."""
        if not self.fits(weight_shape):
            raise ValueError(f"LoRA of rank {self.rank} does not fit weight {tuple(weight_shape)}")
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return product.reshape(weight_shape) * self.scale


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A parsed LoRA file: patches per component, keyed by flat module name.

    ``te1`` is the SD 1.x text encoder / SDXL CLIP-L, ``te2`` SDXL's
    OpenCLIP-bigG. Flat names are module paths with ``.`` replaced by ``_``.
    ``ignored_keys`` are the file's tensors that are not LoRA weights this
    module can merge. Treat the mappings as read-only.
    """

    unet: Mapping[str, LoraPatch] = field(default_factory=dict)
    te1: Mapping[str, LoraPatch] = field(default_factory=dict)
    te2: Mapping[str, LoraPatch] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()

    def component(self, name: LoraComponent) -> Mapping[str, LoraPatch]:
        """The patches of one component."""
        return {"unet": self.unet, "te1": self.te1, "te2": self.te2}[name]


def flat_module_name(dotted: str) -> str:
    """The kohya spelling of a module path: ``a.b.0.c`` → ``a_b_0_c``."""
    return dotted.replace(".", "_")


@dataclass(frozen=True)
class _KeyParts:
    """Where a tensor of a LoRA file belongs; ``role`` None: a part we cannot merge."""

    component: LoraComponent
    module: str
    role: LoraRole | None


def _split_key(key: str) -> _KeyParts | None:
    """Component, flat module name and role of a tensor key; None if not a LoRA key."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, tail = key[len(prefix) :].partition(".")
            return _KeyParts(component, module, _KOHYA_ROLES.get(tail))
    for prefix, component in _PEFT_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            for tail, role in _PEFT_ROLES.items():
                if rest.endswith("." + tail):
                    return _KeyParts(component, flat_module_name(rest[: -len(tail) - 1]), role)
            marker = next((m for m in _PEFT_UNSUPPORTED_MARKERS if m in rest), None)
            if marker is not None:
                return _KeyParts(component, flat_module_name(rest.split(marker, 1)[0]), None)
    return None


@dataclass(frozen=True)
class _AdapterAlphas:
    """diffusers' saved peft config for one component: ``lora_alpha`` and ``alpha_pattern``."""

    default: float | None
    pattern: Mapping[str, float]

    def for_module(self, module: str) -> float | None:
        for suffix, value in self.pattern.items():
            if module == suffix or module.endswith("_" + suffix):
                return value
        return self.default


def _adapter_alphas(metadata: Mapping[str, str] | None) -> dict[LoraComponent, _AdapterAlphas]:
    """Alphas from diffusers' ``lora_adapter_metadata`` (files without alpha tensors)."""
    raw = (metadata or {}).get(_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s in LoRA metadata", _ADAPTER_METADATA_KEY)
        return {}
    alphas = {}
    for prefix, component in _PEFT_PREFIXES.items():
        default = config.get(f"{prefix}lora_alpha")
        pattern = config.get(f"{prefix}alpha_pattern") or {}
        if default is not None or pattern:
            alphas[component] = _AdapterAlphas(
                default=None if default is None else float(default),
                pattern={flat_module_name(k): float(v) for k, v in pattern.items()},
            )
    return alphas


def parse_lora_state_dict(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> LoraWeights:
    """Group the tensors of a LoRA file into patches (see the module docstring for layouts).

    A module with any tensor that cannot be merged (DoRA scales, LoCon mid
    weights, LoRA biases) is skipped whole and its keys listed as ignored.
    """
    groups: dict[tuple[LoraComponent, str], dict[LoraRole | None, str]] = {}
    ignored: list[str] = []
    for key in tensors:
        parts = _split_key(key)
        if parts is None:
            ignored.append(key)
        else:
            groups.setdefault((parts.component, parts.module), {})[parts.role] = key
    alphas = _adapter_alphas(metadata)
    patches: dict[LoraComponent, dict[str, LoraPatch]] = {"unet": {}, "te1": {}, "te2": {}}
    for (component, module), keys in sorted(groups.items()):
        if None in keys or "down" not in keys or "up" not in keys:
            ignored.extend(keys.values())
            continue
        if "alpha" in keys:
            alpha = float(tensors[keys["alpha"]].item())
        else:
            alpha = alphas[component].for_module(module) if component in alphas else None
        patches[component][module] = LoraPatch(tensors[keys["down"]], tensors[keys["up"]], alpha)
    return LoraWeights(**patches, ignored_keys=tuple(sorted(ignored)))


def load_lora(path: Path) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file (kohya or diffusers/peft layout).

    Raises ModelFileError when the file cannot be read or holds no LoRA weights.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            tensors = {key: owned_tensor(handle.get_tensor(key), force=True) for key in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"cannot read LoRA file {path}: {error}") from error
    lora = parse_lora_state_dict(tensors, metadata)
    if not (lora.unet or lora.te1 or lora.te2):
        raise ModelFileError(f"{path} holds no LoRA weights ({len(tensors)} tensors of unknown layout)")
    if lora.ignored_keys:
        logger.warning(
            "lora file %s: %d keys not understood, e.g. %s",
            path.name,
            len(lora.ignored_keys),
            ", ".join(lora.ignored_keys[:3]),
        )
    return lora


@dataclass(frozen=True)
class _MergeResult:
    module: torch.nn.Module
    not_loaded: tuple[str, ...]


def _ldm_unet_names(unet: torch.nn.Module) -> dict[str, str]:
    """Flat LDM layer name → diffusers module name, for kohya SDXL files (``input_blocks_4_1_...``).

    Empty when ``unet`` is not an SD-family diffusers UNet.
    """
    from diffsplit.engine.models.ldm_unet import unet_key_rules

    try:
        rules = unet_key_rules(unet.state_dict().keys())
    except (ValueError, IndexError, KeyError):
        return {}
    names = {}
    for rule in rules:
        module_key = rule.module_keys[0]
        if module_key.endswith(".weight") and rule.ldm_key.endswith(".weight"):
            names[flat_module_name(rule.ldm_key.removesuffix(".weight"))] = module_key.removesuffix(".weight")
    return names


def _text_model_aliases(names: Iterable[str]) -> dict[str, str]:
    """Flat names with and without CLIP's ``text_model.`` level → module path.

    LoRA files name CLIP layers ``text_model_encoder_layers_...``, but
    transformers 5's ``CLIPTextModel`` has no ``text_model`` level (its
    ``WithProjection`` sibling still has one), so both spellings resolve.
    """
    aliases = {}
    for name in names:
        if name.startswith(_TEXT_MODEL_LEVEL):
            aliases[flat_module_name(name.removeprefix(_TEXT_MODEL_LEVEL))] = name
        elif not name.startswith("text_projection"):
            aliases[flat_module_name(_TEXT_MODEL_LEVEL + name)] = name
    return aliases


def _module_names(module: torch.nn.Module, flat_names: Iterable[str], *, ldm_unet: bool) -> dict[str, str]:
    """Flat name → module path for every resolvable name (own module tree first, then aliases)."""
    names = [name for name, _ in module.named_modules() if name]
    by_flat_name = {flat_module_name(name): name for name in names}
    if not ldm_unet and any(flat not in by_flat_name for flat in flat_names):
        by_flat_name = {**_text_model_aliases(names), **by_flat_name}
    if ldm_unet and any(flat not in by_flat_name for flat in flat_names):
        by_flat_name = {**_ldm_unet_names(module), **by_flat_name}
    return by_flat_name


def _merge_into_copy(
    module: torch.nn.Module, patches: Mapping[str, LoraPatch], strength: float, *, ldm_unet: bool = False
) -> _MergeResult:
    """A copy of ``module`` with the patches merged; untouched tensors are shared, not copied."""
    by_flat_name = _module_names(module, patches, ldm_unet=ldm_unet)
    resolved: dict[str, LoraPatch] = {}
    not_loaded: list[str] = []
    for flat, patch in patches.items():
        name = by_flat_name.get(flat)
        weight = getattr(module.get_submodule(name), "weight", None) if name is not None else None
        if not isinstance(weight, torch.Tensor):
            not_loaded.append(flat)
            continue
        if not patch.fits(weight.shape):
            logger.debug("lora patch for %s does not fit weight of shape %s", name, tuple(weight.shape))
            not_loaded.append(flat)
            continue
        resolved[name] = patch
    if not resolved:
        return _MergeResult(module, tuple(not_loaded))
    shared = {id(tensor): tensor for tensor in itertools.chain(module.parameters(), module.buffers())}
    clone = copy.deepcopy(module, memo=shared)
    with torch.no_grad():
        for name, patch in resolved.items():
            target = clone.get_submodule(name)
            weight = target.weight
            merged = weight.detach().float() + strength * patch.delta(weight.shape).to(weight.device)
            # a half-precision base keeps merged weights in float32: what a float32 base gives, exactly
            kept = torch.promote_types(weight.dtype, torch.float32)
            target.weight = torch.nn.Parameter(merged.to(kept), requires_grad=weight.requires_grad)
    return _MergeResult(clone, tuple(not_loaded))


def _encoder_components(clip: TextEncoders) -> tuple[LoraComponent, ...]:
    """Which LoRA component patches each encoder of ``clip``, in order."""
    if len(clip.encoders) == 2:
        return ("te1", "te2")
    if clip.family == "sdxl_refiner":
        return ("te2",)
    return ("te1",)


def apply_lora(
    model: DiffusionModel | None,
    clip: TextEncoders | None,
    lora: LoraWeights,
    strength_model: float,
    strength_clip: float,
    *,
    source: str = "LoRA",
) -> tuple[DiffusionModel | None, TextEncoders | None]:
    """ComfyUI's LoraLoader: new MODEL and CLIP with the LoRA merged at the given strengths.

    The inputs are never modified. A part whose strength is 0, that is None,
    or that the LoRA does not touch is returned as the same object. LoRA keys
    that match no module or do not fit its weight are reported in one warning
    line that starts with ``source`` (the node and the LoRA file).
    """
    not_loaded: list[str] = []
    new_model = model
    if model is not None and strength_model != 0 and lora.unet:
        merged = _merge_into_copy(model.unet, lora.unet, strength_model, ldm_unet=True)
        not_loaded.extend(f"lora_unet_{name}" for name in merged.not_loaded)
        if merged.module is not model.unet:
            new_model = dataclasses.replace(model, unet=merged.module)
    new_clip = clip
    if clip is not None and strength_clip != 0:
        encoders = list(clip.encoders)
        components = _encoder_components(clip)
        for index, component in enumerate(components):
            patches = lora.component(component)
            if patches:
                merged = _merge_into_copy(encoders[index], patches, strength_clip)
                not_loaded.extend(f"lora_{component}_{name}" for name in merged.not_loaded)
                encoders[index] = merged.module
        unused = [c for c in ("te1", "te2") if c not in components and lora.component(c)]
        for component in unused:
            not_loaded.extend(f"lora_{component}_{name}" for name in lora.component(component))
        if any(new is not old for new, old in zip(encoders, clip.encoders, strict=True)):
            new_clip = dataclasses.replace(clip, encoders=tuple(encoders))
    if not_loaded:
        total = len(lora.unet) + len(lora.te1) + len(lora.te2)
        logger.warning(
            "%s: %d of %d keys did not load (the LoRA does not fit this model), e.g. %s",
            source, len(not_loaded), total, ", ".join(not_loaded[:3]),
        )
    return new_model, new_clip


def _kohya_prefix(component: LoraComponent, lora: LoraWeights) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "te1":
        return "lora_te1_" if lora.te2 else "lora_te_"
    return "lora_te2_"


def lora_state_dict(lora: LoraWeights) -> dict[str, torch.Tensor]:
    """The kohya-layout tensors of ``lora`` (alpha stored as a 0-dim float32 tensor when known)."""
    tensors: dict[str, torch.Tensor] = {}
    for component in ("unet", "te1", "te2"):
        prefix = _kohya_prefix(component, lora)
        for module, patch in lora.component(component).items():
            tensors[f"{prefix}{module}.lora_down.weight"] = patch.down.contiguous()
            tensors[f"{prefix}{module}.lora_up.weight"] = patch.up.contiguous()
            if patch.alpha is not None:
                tensors[f"{prefix}{module}.alpha"] = torch.tensor(patch.alpha, dtype=torch.float32)
    return dict(sorted(tensors.items()))


def save_lora(path: Path, lora: LoraWeights, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``lora`` as a kohya-layout ``.safetensors`` file (sorted keys, deterministic bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_sorted(lora_state_dict(lora), str(path), metadata=dict(metadata) if metadata else None)
