"""Loaders of separate model files: UNETLoader, CLIPLoader, DualCLIPLoader, and the legacy CheckpointLoader.

ComfyUI's names, inputs and folders: ``diffusion_models`` (also the legacy
``unet``), ``text_encoders`` (also the legacy ``clip``), ``configs``. What runs:

- UNETLoader: SD 1.x / SDXL / SDXL-refiner UNets (:mod:`..models.unet_file`);
  ``weight_dtype`` ``default`` is float32, the fp8 options round the weights
  through fp8 and compute in float32 (ComfyUI's CPU manual cast, same numbers);
- CLIPLoader ``stable_diffusion``: CLIP-L (SD 1.x), or OpenCLIP bigG alone (the
  SDXL refiner's, as in ComfyUI); DualCLIPLoader ``sdxl``: CLIP-L + bigG in either
  order. Other types fail naming the type. ``device`` (``default``/``cpu``) changes
  nothing here: everything runs on the CPU;
- CheckpointLoader: CheckpointLoaderSimple's load plus the LDM config's
  prediction type, schedule, latent scale and CLIP layer (:mod:`..models.ldm_config`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import kept_file_dtype, load_checkpoint
from diffsplit.engine.models.ldm_config import apply_ldm_config, read_ldm_config
from diffsplit.engine.models.text_encoder_files import load_text_encoder_files
from diffsplit.engine.models.unet_file import WEIGHT_DTYPES, load_unet_file
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec, master_dtype
from diffsplit.engine.types import DiffusionModel, TextEncoders, Vae

UNET_FOLDER = "diffusion_models"
TEXT_ENCODER_FOLDER = "text_encoders"
CONFIG_FOLDER = "configs"
#: CLIPLoader's ``type`` options in current ComfyUI; diffsplit runs the first.
CLIP_TYPES: tuple[str, ...] = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2",
    "ovis", "longcat_image",
)  # fmt: skip
#: DualCLIPLoader's ``type`` options in current ComfyUI; diffsplit runs the first.
DUAL_CLIP_TYPES: tuple[str, ...] = (
    "sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15", "kandinsky5",
    "kandinsky5_image", "ltxv", "newbie", "ace",
)  # fmt: skip
DEVICES: tuple[str, ...] = ("default", "cpu")


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Prefix a loader's ModelFileError with the input(s) and name(s) it was reading."""
    try:
        yield
    except ModelFileError as error:
        raise ModelFileError(f"{what}: {error}") from error


def _supported(value: str, supported: str, node: str) -> None:
    if value != supported:
        raise ValueError(
            f"type {value!r} is not supported: diffsplit's {node} loads SD-family text encoders, "
            f"type {supported!r} only"
        )


def unet_loader(ctx: NodeContext, *, unet_name: str, weight_dtype: str) -> tuple[DiffusionModel]:
    """ComfyUI UNETLoader: a MODEL from a diffusion-model file."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    path = ctx.model_path(UNET_FOLDER, unet_name)
    with _reading(f"unet_name {unet_name!r}"):
        return (load_unet_file(path, weight_dtype=weight_dtype, dtype=_kept(ctx, "unet", path)),)


def clip_loader(
    ctx: NodeContext, *, clip_name: str, type: str, device: str = "default"
) -> tuple[TextEncoders]:
    """ComfyUI CLIPLoader: a CLIP from one text-encoder file (type ``stable_diffusion``)."""
    _supported(type, CLIP_TYPES[0], "CLIPLoader")
    path = ctx.model_path(TEXT_ENCODER_FOLDER, clip_name)
    with _reading(f"clip_name {clip_name!r}"):
        return (load_text_encoder_files([path], dtypes=[_kept(ctx, "text_encoder", path)]),)


def dual_clip_loader(
    ctx: NodeContext,
    *,
    clip_name1: str,
    clip_name2: str,
    type: str,
    device: str = "default",
) -> tuple[TextEncoders]:
    """ComfyUI DualCLIPLoader: SDXL's CLIP from its CLIP-L and OpenCLIP bigG files, in either order."""
    _supported(type, DUAL_CLIP_TYPES[0], "DualCLIPLoader")
    paths = [ctx.model_path(TEXT_ENCODER_FOLDER, clip_name1), ctx.model_path(TEXT_ENCODER_FOLDER, clip_name2)]
    with _reading(f"clip_name1 {clip_name1!r}, clip_name2 {clip_name2!r}"):
        dtypes = [_kept(ctx, "text_encoder", path) for path in paths]
        return (load_text_encoder_files(paths, dtypes=dtypes),)  # always CLIP-L + bigG, or an error


def checkpoint_loader(
    ctx: NodeContext, *, config_name: str, ckpt_name: str
) -> tuple[DiffusionModel, TextEncoders, Vae]:
    """ComfyUI CheckpointLoader (legacy): CheckpointLoaderSimple's load with the LDM config applied."""
    config_path = ctx.model_path(CONFIG_FOLDER, config_name)
    with _reading(f"config_name {config_name!r}"):
        config = read_ldm_config(config_path)
    checkpoint_path = ctx.model_path("checkpoints", ckpt_name)
    with _reading(f"ckpt_name {ckpt_name!r}"):
        parts = load_checkpoint(checkpoint_path)
    parts = apply_ldm_config(parts, config)
    return (parts.model, parts.clip, parts.vae)


def _kept(ctx: NodeContext, kind: str, path: Path) -> torch.dtype:
    """The dtype a file's model loads in: the context's half dtype for ``kind`` where the file stores
    every weight so (``kept_file_dtype``), else float32."""
    wanted = master_dtype(ctx, kind)
    return torch.float32 if wanted is None else kept_file_dtype(path, wanted)


def _device() -> InputSpec:
    return InputSpec("device", "COMBO", default=DEVICES[0], choices=DEVICES, optional=True)


UNET_LOADER = NodeClass(
    name="UNETLoader",
    inputs=(
        InputSpec("unet_name", "COMBO", model_folder=UNET_FOLDER),
        InputSpec("weight_dtype", "COMBO", default="default", choices=tuple(WEIGHT_DTYPES)),
    ),
    outputs=(OutputSpec("MODEL", "MODEL"),),
    function=unet_loader,
    category="advanced/loaders",
    is_loader=True,
    description="Load a diffusion model (UNet) file: SD 1.x, SDXL or the SDXL refiner.",
)

CLIP_LOADER = NodeClass(
    name="CLIPLoader",
    inputs=(
        InputSpec("clip_name", "COMBO", model_folder=TEXT_ENCODER_FOLDER),
        InputSpec("type", "COMBO", default=CLIP_TYPES[0], choices=CLIP_TYPES),
        _device(),
    ),
    outputs=(OutputSpec("CLIP", "CLIP"),),
    function=clip_loader,
    category="advanced/loaders",
    is_loader=True,
    description="Load one text encoder file: CLIP-L (SD 1.x) or OpenCLIP bigG (the SDXL refiner).",
)

DUAL_CLIP_LOADER = NodeClass(
    name="DualCLIPLoader",
    inputs=(
        InputSpec("clip_name1", "COMBO", model_folder=TEXT_ENCODER_FOLDER),
        InputSpec("clip_name2", "COMBO", model_folder=TEXT_ENCODER_FOLDER),
        InputSpec("type", "COMBO", default=DUAL_CLIP_TYPES[0], choices=DUAL_CLIP_TYPES),
        _device(),
    ),
    outputs=(OutputSpec("CLIP", "CLIP"),),
    function=dual_clip_loader,
    category="advanced/loaders",
    is_loader=True,
    description="Load SDXL's two text encoder files (CLIP-L and OpenCLIP bigG, either order).",
)

CHECKPOINT_LOADER = NodeClass(
    name="CheckpointLoader",
    inputs=(
        InputSpec("config_name", "COMBO", model_folder=CONFIG_FOLDER),
        InputSpec("ckpt_name", "COMBO", model_folder="checkpoints"),
    ),
    outputs=(OutputSpec("MODEL", "MODEL"), OutputSpec("CLIP", "CLIP"), OutputSpec("VAE", "VAE")),
    function=checkpoint_loader,
    category="advanced/loaders",
    is_loader=True,
    description="Load a checkpoint with an LDM .yaml config (prediction type, schedule, latent scale).",
)

NODES: tuple[NodeClass, ...] = (UNET_LOADER, CLIP_LOADER, DUAL_CLIP_LOADER, CHECKPOINT_LOADER)
