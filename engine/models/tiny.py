"""A tiny, seeded, random-weight model set in the real architectures and file layouts.

``write_tiny_models(root)`` writes a ComfyUI-style models folder: single-file
SD 1.5 / SDXL / SDXL-refiner checkpoints with the original key names, a VAE, a CLIP vision model,
a ControlNet, two kohya LoRAs, a 2x ESRGAN upscale model, two textual-inversion embeddings,
and diffusers folders of SD 1.5 and SDXL that
hold the same weights as the single files. The architectures follow the real
families' rules (SD 1.x: 8 heads; SDXL: 64 channels per head; CLIP: hidden/64
heads; 32 norm groups) with the real 49,408-token CLIP vocabulary, at tens
of MB per file, so every loader walks its real code path. The same seed
always gives byte-identical files (the checkpoints carry at most one
metadata entry: safetensors writes several in random order).
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

import torch
from diffsplit.engine.models.checkpoint import CheckpointParts, save_checkpoint, save_controlnet, save_vae
from diffsplit.engine.models.depth_model import write_tiny_depth_model
from diffsplit.engine.models.genie_head import GENIE_HEAD_FOLDER, save_genie_head, tiny_genie_head
from diffsplit.engine.models.keypoint_model import FACE, HAND, write_tiny_keypoint_model
from diffsplit.engine.models.lineart_model import write_tiny_lineart_model
from diffsplit.engine.models.lora import LoraPatch, LoraWeights, flat_module_name, save_lora
from diffsplit.engine.models.pose_model import write_tiny_body_pose_model
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.segmentation_model import tiny_palette, write_tiny_segmentation_model
from diffsplit.engine.models.t2i_adapter import original_layout, tiny_t2i_adapter
from diffsplit.engine.models.tiny_clip_vision import TINY_CLIP_VISION_FILE, write_tiny_clip_vision
from diffsplit.engine.models.tiny_embeddings import (
    SD15_EMBEDDING_FILE,
    SDXL_EMBEDDING_FILE,
    write_tiny_embeddings,
)
from diffsplit.engine.models.tiny_gligen import TINY_GLIGEN_FILE, write_tiny_gligen
from diffsplit.engine.models.tiny_ip2p import TINY_IP2P_FILE, write_tiny_ip2p
from diffsplit.engine.models.tiny_split_files import SplitFilePaths, write_split_files
from diffsplit.engine.models.tiny_upscale import TINY_ESRGAN_FILE, write_tiny_esrgan
from diffsplit.engine.models.tokenizers import clip_tokenizer, write_tokenizer_files
from diffsplit.engine.models.uniformer import write_tiny_uniformer
from diffsplit.engine.types import ControlNet, DiffusionModel, ModelFamily, TextEncoders, Vae
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

SD15_VAE_SCALE = 0.18215
#: The tiny GENIE head's file name in ``genie_heads``.
TINY_GENIE_HEAD_FILE = "tiny-sd15-genie.safetensors"
SDXL_VAE_SCALE = 0.13025
_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm)
_SCHEDULE = MappingProxyType(
    {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
)


#: The tiny Depth Anything file in the preprocessors folder.
TINY_DEPTH_FILE = "tiny-depth-anything.safetensors"
#: The tiny T2I-Adapter file in the controlnet folder (ComfyUI loads adapters from there).
TINY_T2I_ADAPTER_FILE = "tiny-sd15-t2i-adapter.safetensors"


@dataclass(frozen=True)
class TinyModelSet:
    """Paths of the files written by :func:`write_tiny_models`."""

    root: Path
    sd15_checkpoint: Path
    sdxl_checkpoint: Path
    sdxl_refiner_checkpoint: Path
    sd15_lora: Path
    sdxl_lora: Path
    vae: Path
    sd15_controlnet: Path
    sd15_diffusers: Path
    sdxl_diffusers: Path
    clip_vision: Path
    sd15_gligen: Path
    sd15_embedding: Path
    sdxl_embedding: Path
    upscale_esrgan: Path
    sd15_ip2p_checkpoint: Path
    #: a seeded GENIE head for the SD 1.5 checkpoint (the genie_head sampler)
    sd15_genie_head: Path
    #: the SD 1.5 / SDXL checkpoints split into separate files (tiny_split_files)
    split_files: SplitFilePaths
    #: a seeded Depth Anything (the depth preprocessors' model)
    depth_anything: Path
    #: a seeded full T2I-Adapter for the SD 1.5 UNet, in the original TencentARC key layout
    sd15_t2i_adapter: Path
    #: a seeded line-art generator under the name LineArtPreprocessor reads by default
    lineart: Path
    #: a seeded OpenPose body model, the twin of the name OpenposePreprocessor reads by default
    body_pose: Path
    #: seeded OpenPose hand and face models, the twins of ``hand_pose_model.pth`` / ``facenet.pth``
    hand_pose: Path
    face_pose: Path
    #: a seeded UniFormer-UperNet in the pack's keys, the twin of the name the segmentation
    #: preprocessors read by default (``upernet_global_small.pth``)
    segmentation: Path
    #: a seeded UperNet on a ConvNeXt backbone, as transformers builds it (``ckpt_name`` names it)
    segmentation_convnext: Path

    def paths(self) -> tuple[Path, ...]:
        """Every file or folder of the set, in a fixed order."""
        found: list[Path] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SplitFilePaths):
                found.extend(value.as_fields().values())
            elif f.name != "root":
                found.append(value)
        return tuple(found)


def tiny_unet_config(family: ModelFamily) -> dict[str, object]:
    """The UNet config of the tiny set's ``family`` (real block layout, few channels)."""
    if family == "sd15":
        return {
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "layers_per_block": 2,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "sample_size": 8,
            "norm_num_groups": 32,
        }
    if family == "sdxl":
        return {
            "block_out_channels": (32, 64, 128),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "attention_head_dim": (1, 1, 2),
            "transformer_layers_per_block": (1, 1, 2),
            "use_linear_projection": True,
            "cross_attention_dim": 64 + 128,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 128,
            "sample_size": 8,
            "norm_num_groups": 32,
        }
    return {
        "block_out_channels": (32, 64, 128, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (1, 1, 2, 2),
        "transformer_layers_per_block": 1,
        "use_linear_projection": True,
        "cross_attention_dim": 128,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 5 * 8 + 128,
        "sample_size": 8,
        "norm_num_groups": 32,
    }


def _clip_config(kind: str) -> CLIPTextConfig:
    # Token ids as in the published SD configs (eos 2 selects CLIP's argmax pooling).
    common = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "num_hidden_layers": 2,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    if kind == "clip_l":
        return CLIPTextConfig(
            hidden_size=64,
            num_attention_heads=1,
            intermediate_size=128,
            hidden_act="quick_gelu",
            projection_dim=64,
            **common,
        )
    return CLIPTextConfig(
        hidden_size=128,
        num_attention_heads=2,
        intermediate_size=512,
        hidden_act="gelu",
        projection_dim=128,
        **common,
    )


def _vae(family: ModelFamily) -> AutoencoderKL:
    # sample_size and scaling_factor as in the published VAE configs (512/0.18215 and 1024/0.13025).
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512 if family == "sd15" else 1024,
        scaling_factor=SD15_VAE_SCALE if family == "sd15" else SDXL_VAE_SCALE,
    )


def _generator(seed: int, name: str) -> torch.Generator:
    """An independent, reproducible random stream per (seed, component name)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def reinitialize(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise: norms near identity, weights ~ N(0, 1/fan_in).

    Unlike the libraries' defaults nothing stays zero (no zero-initialised
    output layers), so every layer influences the output. Returns ``module``.
    """
    with torch.no_grad():
        for submodule in module.modules():
            is_norm = isinstance(submodule, _NORM_TYPES)
            for name, param in submodule.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if is_norm and name == "weight":
                    param.copy_(1.0 + 0.02 * noise)
                elif param.ndim < 2:
                    param.copy_(0.02 * noise)
                else:
                    fan_in = param[0].numel()
                    param.copy_(noise / fan_in**0.5)
    return module.eval()


def tiny_checkpoint_parts(family: ModelFamily, seed: int = 0) -> CheckpointParts:
    """In-memory tiny model, text encoders and VAE of ``family`` (as a checkpoint holds them)."""
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel(**tiny_unet_config(family))
        if family == "sd15":
            encoders: tuple[torch.nn.Module, ...] = (CLIPTextModel(_clip_config("clip_l")),)
            tokenizers = (clip_tokenizer("clip_l"),)
        elif family == "sdxl":
            encoders = (
                CLIPTextModel(_clip_config("clip_l")),
                CLIPTextModelWithProjection(_clip_config("clip_g")),
            )
            tokenizers = (clip_tokenizer("clip_l"), clip_tokenizer("clip_g"))
        else:
            encoders = (CLIPTextModelWithProjection(_clip_config("clip_g")),)
            tokenizers = (clip_tokenizer("clip_g"),)
        vae = _vae(family)
    reinitialize(unet, _generator(seed, f"{family}/unet"))
    for index, encoder in enumerate(encoders):
        reinitialize(encoder, _generator(seed, f"{family}/text_encoder{index}"))
    reinitialize(vae, _generator(seed, f"{family}/vae"))
    return CheckpointParts(
        model=DiffusionModel(unet=unet, family=family),
        clip=TextEncoders(encoders=encoders, tokenizers=tokenizers, family=family),
        vae=Vae(model=vae, scaling_factor=vae.config.scaling_factor),
    )


def tiny_controlnet(unet: torch.nn.Module, seed: int = 0) -> ControlNet:
    """A ControlNet shaped like ``unet`` (diffusers ``from_unet``), with non-zero zero-convs."""
    with torch.random.fork_rng(devices=[]):
        model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return ControlNet(model=reinitialize(model, _generator(seed, "controlnet")))


def _lora_patches(
    module: torch.nn.Module,
    suffixes: tuple[str, ...],
    generator: torch.Generator,
    rank: int,
    alpha: float,
    prefix: str = "",
) -> dict[str, LoraPatch]:
    """Random patches for the linear/conv layers whose path ends with one of ``suffixes``.

    ``prefix`` is prepended to paths that lack it (CLIP's ``text_model.`` level,
    which kohya names always carry but transformers 5's ``CLIPTextModel`` lacks).
    """
    patches = {}
    for path, layer in module.named_modules():
        if not path.endswith(suffixes) or not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            continue
        name = path if path.startswith(prefix) else prefix + path
        weight = layer.weight
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank) + (1,) * (weight.ndim - 2)
        down = torch.randn(down_shape, generator=generator) / weight[0].numel() ** 0.5
        up = torch.randn(up_shape, generator=generator) * (0.5 / rank**0.5)
        patches[flat_module_name(name)] = LoraPatch(down=down, up=up, alpha=alpha)
    return patches


_UNET_LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "down_blocks.0.resnets.0.conv1",
)
_TEXT_LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def random_lora(parts: CheckpointParts, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> LoraWeights:
    """A kohya-style LoRA for ``parts``: UNet attention (and one conv) plus every text-encoder layer."""
    family = parts.model.family
    unet = _lora_patches(
        parts.model.unet, _UNET_LORA_TARGETS, _generator(seed, f"{family}/lora/unet"), rank, alpha
    )
    components = ("te2",) if family == "sdxl_refiner" else ("te1", "te2")
    text = {
        component: _lora_patches(
            encoder,
            _TEXT_LORA_TARGETS,
            _generator(seed, f"{family}/lora/{component}"),
            rank,
            alpha,
            "text_model.",
        )
        for component, encoder in zip(components, parts.clip.encoders, strict=False)
    }
    return LoraWeights(unet=unet, te1=text.get("te1", {}), te2=text.get("te2", {}))


def _scheduler(family: ModelFamily) -> PNDMScheduler | EulerDiscreteScheduler:
    if family == "sd15":
        return PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading", steps_offset=1)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar, restoring the previous setting."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _write_diffusers_folder(dest: Path, parts: CheckpointParts) -> None:
    """A ``save_pretrained`` folder of the pipeline, with our tokenizer files."""
    family = parts.model.family
    common = {"vae": parts.vae.model, "unet": parts.model.unet, "scheduler": _scheduler(family)}
    if family == "sd15":
        (text_encoder,) = parts.clip.encoders
        pipe = StableDiffusionPipeline(
            **common,
            text_encoder=text_encoder,
            tokenizer=parts.clip.tokenizers[0],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        tokenizer_kinds = {"tokenizer": "clip_l"}
    else:
        text_encoder, text_encoder_2 = parts.clip.encoders
        pipe = StableDiffusionXLPipeline(
            **common,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=parts.clip.tokenizers[0],
            tokenizer_2=parts.clip.tokenizers[1],
            add_watermarker=False,
        )
        tokenizer_kinds = {"tokenizer": "clip_l", "tokenizer_2": "clip_g"}
    with _quiet_progress_bars():
        pipe.save_pretrained(dest, safe_serialization=True)
    for folder, kind in tokenizer_kinds.items():
        shutil.rmtree(dest / folder)
        write_tokenizer_files(dest / folder, kind)


def write_tiny_models(root: Path, seed: int = 0) -> TinyModelSet:
    """Write the tiny model set under ``root`` (a ComfyUI-style models folder) and return its paths."""
    root = Path(root)
    model_set = TinyModelSet(
        root=root,
        sd15_checkpoint=root / "checkpoints" / "tiny-sd15.safetensors",
        sdxl_checkpoint=root / "checkpoints" / "tiny-sdxl.safetensors",
        sdxl_refiner_checkpoint=root / "checkpoints" / "tiny-sdxl-refiner.safetensors",
        sd15_lora=root / "loras" / "tiny-sd15-lora.safetensors",
        sdxl_lora=root / "loras" / "tiny-sdxl-lora.safetensors",
        vae=root / "vae" / "tiny-vae.safetensors",
        sd15_controlnet=root / "controlnet" / "tiny-sd15-controlnet.safetensors",
        sd15_diffusers=root / "diffusers" / "tiny-sd15",
        sdxl_diffusers=root / "diffusers" / "tiny-sdxl",
        clip_vision=root / "clip_vision" / TINY_CLIP_VISION_FILE,
        sd15_gligen=root / "gligen" / TINY_GLIGEN_FILE,
        sd15_embedding=root / "embeddings" / SD15_EMBEDDING_FILE,
        sdxl_embedding=root / "embeddings" / SDXL_EMBEDDING_FILE,
        upscale_esrgan=root / "upscale_models" / TINY_ESRGAN_FILE,
        sd15_ip2p_checkpoint=root / "checkpoints" / TINY_IP2P_FILE,
        sd15_genie_head=root / GENIE_HEAD_FOLDER / TINY_GENIE_HEAD_FILE,
        split_files=SplitFilePaths.under(root),
        depth_anything=root / "preprocessors" / TINY_DEPTH_FILE,
        sd15_t2i_adapter=root / "controlnet" / TINY_T2I_ADAPTER_FILE,
        lineart=root / "preprocessors" / "sk_model.safetensors",
        body_pose=root / "preprocessors" / "body_pose_model.safetensors",
        hand_pose=root / "preprocessors" / "hand_pose_model.safetensors",
        face_pose=root / "preprocessors" / "facenet.safetensors",
        segmentation=root / "preprocessors" / "upernet_global_small.safetensors",
        segmentation_convnext=root / "preprocessors" / "upernet.safetensors",
    )
    for folder in ("checkpoints", "loras", "vae", "controlnet", "diffusers"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    sd15 = tiny_checkpoint_parts("sd15", seed)
    sdxl = tiny_checkpoint_parts("sdxl", seed)
    refiner = tiny_checkpoint_parts("sdxl_refiner", seed)
    save_checkpoint(model_set.sd15_checkpoint, sd15)
    save_checkpoint(model_set.sdxl_checkpoint, sdxl)
    save_checkpoint(model_set.sdxl_refiner_checkpoint, refiner)
    save_lora(model_set.sd15_lora, random_lora(sd15, seed))
    save_lora(model_set.sdxl_lora, random_lora(sdxl, seed))
    standalone_vae = reinitialize(_vae("sd15"), _generator(seed, "standalone/vae"))
    save_vae(model_set.vae, Vae(model=standalone_vae, scaling_factor=SD15_VAE_SCALE))
    save_controlnet(model_set.sd15_controlnet, tiny_controlnet(sd15.model.unet, seed))
    _write_diffusers_folder(model_set.sd15_diffusers, sd15)
    _write_diffusers_folder(model_set.sdxl_diffusers, sdxl)
    write_tiny_clip_vision(model_set.clip_vision, seed)
    write_tiny_gligen(model_set.sd15_gligen, seed)
    write_tiny_embeddings(root / "embeddings", seed)
    write_tiny_esrgan(model_set.upscale_esrgan, seed)
    write_tiny_ip2p(model_set.sd15_ip2p_checkpoint, seed)
    save_genie_head(tiny_genie_head(seed + 17), model_set.sd15_genie_head)
    write_split_files(model_set.split_files, sd15, sdxl)
    write_tiny_depth_model(model_set.depth_anything, seed)
    adapter = tiny_t2i_adapter(tuple(sd15.model.unet.config.block_out_channels), seed)
    save_file_sorted(original_layout(adapter), model_set.sd15_t2i_adapter)
    write_tiny_lineart_model(model_set.lineart, seed)
    write_tiny_body_pose_model(model_set.body_pose, seed)
    write_tiny_keypoint_model(model_set.hand_pose, HAND, seed)
    write_tiny_keypoint_model(model_set.face_pose, FACE, seed)
    write_tiny_uniformer(model_set.segmentation, seed, palette=tiny_palette())
    write_tiny_segmentation_model(model_set.segmentation_convnext, seed)
    return model_set


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def describe(model_set: TinyModelSet) -> str:
    """A listing of the set's files (relative to its root) with their sizes."""
    lines = [f"tiny model set in {model_set.root}"]
    for path in model_set.paths():
        relative = path.relative_to(model_set.root).as_posix() + ("/" if path.is_dir() else "")
        lines.append(f"  {relative:<48} {_size(path) / 1e6:8.2f} MB")
    return "\n".join(lines)
