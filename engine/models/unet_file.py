"""Standalone diffusion-model (UNet) files, as ComfyUI's UNETLoader reads them.

Layouts: LDM keys, bare or under ``model.diffusion_model.`` (so a whole
checkpoint loads too, as in ComfyUI), or diffusers ``UNet2DConditionModel``
keys. The family comes from the shapes alone:

- no ``label_emb`` (no added embeddings): SD 1.x; a cross-attention width of
  1024 is SD 2.x, which is refused;
- ``label_emb``: SDXL. The refiner conditions on OpenCLIP bigG only, so its
  cross-attention width is the pooled width and ``adm_in_channels`` minus it
  holds five time ids; anything else is the base. The base's pooled width is
  not in a UNet's shapes: it is the OpenCLIP projection's width when the file is
  a whole checkpoint, else SDXL's 1280 when the rest fits (every real file),
  else ``addition_time_embed_dim`` must come from ``diffsplit.unet`` metadata.

Config values shapes cannot tell come from ``diffsplit.unet`` metadata (as in
checkpoints); the noise schedule from ``diffsplit.sampling`` metadata or a
``v_pred`` key (ComfyUI's v-prediction marker).

``weight_dtype`` (UNETLoader's option): ``default`` loads float32, as the
checkpoint loader does. The fp8 options round every parameter through that
fp8 format and keep it in float32, so the model computes in float32 on exactly
the values ComfyUI's manual cast computes with on a CPU (fp8 storage, cast to
float32 per layer); the memory fp8 would save is not saved.
``fp8_e4m3fn_fast`` is ``fp8_e4m3fn`` here: its fast path is fp8 matrix
multiplication, which a CPU does not have (ComfyUI falls back the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models import infer_config as infer
from diffsplit.engine.models.checkpoint import (
    SAMPLING_COMPONENT,
    UNET_PREFIX,
    V_PRED_KEY,
    FileLayout,
    _ldm_tensors,
    _load_module,
    _read_sampling,
    _standalone_shapes,
    text_slots,
)
from diffsplit.engine.models.ldm_keys import TensorFile, open_tensor_file, same_rules
from diffsplit.engine.models.ldm_unet import unet_key_rules
from diffsplit.engine.models.safetensors_io import PendingTensor, write_safetensors
from diffsplit.engine.types import DiffusionModel, ModelFamily, ModelSampling
from diffusers import UNet2DConditionModel

#: UNETLoader's weight_dtype options and the format each rounds the weights through (None: none).
WEIGHT_DTYPES: Mapping[str, torch.dtype | None] = MappingProxyType({
    "default": None,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
})  # fmt: skip
LDM_MARKER_KEY = "input_blocks.0.0.weight"
DIFFUSERS_MARKER_KEYS = ("conv_in.weight", "time_embedding.linear_1.weight")
#: Cross-attention width of SD 2.x UNets (OpenCLIP ViT-H).
SD2_CONTEXT_DIM = 1024
REFINER_TIME_IDS = infer.ADD_TIME_ID_COUNT["sdxl_refiner"]
#: Keys that name another kind of model file, for a helpful error.
_OTHER_KINDS = (
    ("input_hint_block.0.weight", "a ControlNet (load it with ControlNetLoader)"),
    ("control_model.input_hint_block.0.weight", "a ControlNet (load it with ControlNetLoader)"),
    ("controlnet_cond_embedding.conv_in.weight", "a diffusers ControlNet (load it with ControlNetLoader)"),
    ("encoder.conv_in.weight", "a VAE (load it with VAELoader)"),
    ("text_model.embeddings.token_embedding.weight", "a text encoder (load it with CLIPLoader)"),
)


def find_unet_layout(source: TensorFile) -> FileLayout:
    """Where the UNet's keys are; ModelFileError naming what the file holds instead."""
    for marker, what in _OTHER_KINDS:
        if marker in source.shapes:
            raise ModelFileError(f"{source.path}: not a diffusion model (UNet) file: it is {what}")
    for prefix in (UNET_PREFIX, ""):
        if prefix + LDM_MARKER_KEY in source.shapes:
            return FileLayout(prefix, diffusers=False)
    if all(key in source.shapes for key in DIFFUSERS_MARKER_KEYS):
        return FileLayout("", diffusers=True)
    raise ModelFileError(
        f"{source.path}: not a diffusion model (UNet) file: no LDM '{LDM_MARKER_KEY}' "
        f"(bare or under '{UNET_PREFIX}') and no diffusers '{DIFFUSERS_MARKER_KEYS[0]}'"
    )


def unet_family(shapes: infer.Shapes) -> tuple[ModelFamily, int | None]:
    """The family of LDM UNet ``shapes`` and, for the refiner, its pooled width (see the module doc)."""
    to_k = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ModelFileError("no cross-attention weights ('attn2.to_k'): not an SD-family UNet")
    context_dim = to_k[1]
    if "label_emb.0.0.weight" not in shapes:
        if context_dim == SD2_CONTEXT_DIM:
            raise ModelFileError("an SD 2.x UNet (cross-attention width 1024) is not supported")
        return "sd15", None
    adm_in = shapes["label_emb.0.0.weight"][1]
    extra = adm_in - context_dim
    if extra > 0 and extra % REFINER_TIME_IDS == 0:
        return "sdxl_refiner", context_dim
    return "sdxl", None


def _checkpoint_pooled_width(source: TensorFile) -> int | None:
    """The OpenCLIP bigG projection width of a whole SDXL checkpoint (None when it has no bigG)."""
    for slot in text_slots("sdxl"):
        shape = source.shapes.get(slot.prefix + "text_projection")
        if slot.kind == "clip_g" and shape is not None and len(shape) == 2:
            return shape[1]
    return None


def _rounded(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """``module`` with every parameter rounded through ``dtype`` in place (storage dtype kept)."""
    if dtype is not None:
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(parameter.to(dtype).to(parameter.dtype))
    return module


def load_unet_file(
    path: Path, *, weight_dtype: str = "default", dtype: torch.dtype = torch.float32
) -> DiffusionModel:
    """A MODEL from a UNet-only file (or a checkpoint's UNet part); ModelFileError when it is none.

    ``weight_dtype`` is one of :data:`WEIGHT_DTYPES` (see the module doc); ``dtype`` is what the
    ``default`` weight dtype loads in (the fp8 ones always compute in float32).
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    path = Path(path)
    with open_tensor_file(path) as source:
        layout = find_unet_layout(source)
        try:
            shapes = _standalone_shapes(source, layout.prefix, layout.diffusers, unet_key_rules)
            family, pooled_dim = unet_family(shapes)
            if family == "sdxl" and layout.prefix == UNET_PREFIX:
                pooled_dim = _checkpoint_pooled_width(source)
            config = infer.infer_unet_config(shapes, family, pooled_dim=pooled_dim)
            config.update(infer.read_overrides(source.metadata, "unet"))
        except ModelFileError as error:
            raise ModelFileError(f"{path}: UNet: {error}") from error
        if config.get("addition_embed_type") and config.get("addition_time_embed_dim") is None:
            raise ModelFileError(
                f"{path}: cannot infer addition_time_embed_dim of this SDXL UNet (its adm_in_channels do "
                f"not fit SDXL's pooled width {infer.SDXL_POOLED_DIM}); store it as 'diffsplit.unet' metadata"
            )
        rules_for = same_rules if layout.diffusers else unet_key_rules
        unet = _load_module(
            source, layout.prefix, partial(UNet2DConditionModel, **config), rules_for,
            dtype if weight_dtype == "default" else torch.float32,
        )
        sampling = _read_sampling(source)
    return DiffusionModel(unet=_rounded(unet, WEIGHT_DTYPES[weight_dtype]), family=family, sampling=sampling)


def save_unet_file(path: Path, model: DiffusionModel, *, prefix: str = "") -> None:
    """Write ``model``'s UNet with LDM keys under ``prefix`` ("" or ``model.diffusion_model.``).

    Config values :func:`load_unet_file` would not infer, and a non-default
    noise schedule, are stored as ``diffsplit.*`` metadata.
    """
    if prefix not in ("", UNET_PREFIX):
        raise ValueError(f"prefix must be '' or {UNET_PREFIX!r}, not {prefix!r}")
    tensors = _ldm_tensors(model.unet, unet_key_rules, prefix)
    shapes = {key[len(prefix) :]: tuple(tensor.shape) for key, tensor in tensors.items()}
    family, pooled_dim = unet_family(shapes)
    if family != model.family:
        raise ValueError(f"a {model.family} UNet would load as {family}: its shapes do not tell it apart")
    inferred = infer.infer_unet_config(shapes, family, pooled_dim=pooled_dim)
    overrides = infer.diffusers_overrides(UNet2DConditionModel, model.unet.config, inferred)
    metadata = infer.write_overrides("unet", overrides)
    if model.sampling.prediction_type == "v_prediction" and model.sampling == ModelSampling(
        prediction_type="v_prediction"
    ):
        tensors[V_PRED_KEY] = PendingTensor.of(torch.zeros(0))
    elif model.sampling != ModelSampling():
        metadata.update(infer.write_overrides(SAMPLING_COMPONENT, dataclasses.asdict(model.sampling)))
    write_safetensors(tensors, path, metadata=metadata)
