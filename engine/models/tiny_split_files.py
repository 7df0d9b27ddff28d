"""The tiny SD 1.5 and SDXL checkpoints split into the separate files people download.

Written by :func:`diffsplit.engine.models.tiny.write_tiny_models` next to the
checkpoints, with the checkpoints' own weights, so that UNETLoader +
CLIPLoader/DualCLIPLoader + VAELoader rebuild exactly what
CheckpointLoaderSimple loads:

- ``diffusion_models/tiny-sd15-unet.safetensors``: bare LDM keys;
- ``diffusion_models/tiny-sdxl-unet.safetensors``: LDM keys under ``model.diffusion_model.``
  (its ``addition_time_embed_dim`` rides in ``diffsplit.unet`` metadata: tiny widths do not tell it);
- ``text_encoders/tiny-clip-l.safetensors`` (SD 1.5's), ``tiny-sdxl-clip-l.safetensors`` and
  ``tiny-sdxl-clip-g.safetensors``: the transformers layout of the published ``clip_l``/``clip_g`` files;
- ``vae/tiny-sd15-vae.safetensors``, ``vae/tiny-sdxl-vae.safetensors``: LDM keys;
- ``configs/v1-inference.yaml``: a minimal LDM config in the real format, describing the tiny SD 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from diffsplit.engine.models.checkpoint import UNET_PREFIX, CheckpointParts, save_vae
from diffsplit.engine.models.text_encoder_files import save_text_encoder_file
from diffsplit.engine.models.unet_file import save_unet_file

#: The config, in the layout of Stable Diffusion's ``v1-inference.yaml``, sized like the tiny SD 1.5.
LDM_CONFIG_TEXT = """\
# An LDM model config (the format of Stable Diffusion's v1-inference.yaml) for the tiny SD 1.5.
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    conditioning_key: crossattn
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1, 2 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 64
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 2, 2 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


@dataclass(frozen=True)
class SplitFilePaths:
    """Where :func:`write_split_files` writes each file."""

    sd15_unet: Path
    sdxl_unet: Path
    sd15_clip_l: Path
    sdxl_clip_l: Path
    sdxl_clip_g: Path
    sd15_vae: Path
    sdxl_vae: Path
    ldm_config: Path

    @classmethod
    def under(cls, root: Path) -> SplitFilePaths:
        """The paths in the models folder ``root``."""
        root = Path(root)
        return cls(
            sd15_unet=root / "diffusion_models" / "tiny-sd15-unet.safetensors",
            sdxl_unet=root / "diffusion_models" / "tiny-sdxl-unet.safetensors",
            sd15_clip_l=root / "text_encoders" / "tiny-clip-l.safetensors",
            sdxl_clip_l=root / "text_encoders" / "tiny-sdxl-clip-l.safetensors",
            sdxl_clip_g=root / "text_encoders" / "tiny-sdxl-clip-g.safetensors",
            sd15_vae=root / "vae" / "tiny-sd15-vae.safetensors",
            sdxl_vae=root / "vae" / "tiny-sdxl-vae.safetensors",
            ldm_config=root / "configs" / "v1-inference.yaml",
        )

    def as_fields(self) -> dict[str, Path]:
        """Field name → path (the matching TinyModelSet fields)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


def write_split_files(paths: SplitFilePaths, sd15: CheckpointParts, sdxl: CheckpointParts) -> None:
    """Write the split-out files of the tiny ``sd15`` and ``sdxl`` checkpoints to ``paths``."""
    for path in paths.as_fields().values():
        path.parent.mkdir(parents=True, exist_ok=True)
    save_unet_file(paths.sd15_unet, sd15.model)
    save_unet_file(paths.sdxl_unet, sdxl.model, prefix=UNET_PREFIX)
    save_text_encoder_file(paths.sd15_clip_l, sd15.clip.encoders[0], "clip_l")
    save_text_encoder_file(paths.sdxl_clip_l, sdxl.clip.encoders[0], "clip_l")
    save_text_encoder_file(paths.sdxl_clip_g, sdxl.clip.encoders[1], "clip_g")
    save_vae(paths.sd15_vae, sd15.vae)
    save_vae(paths.sdxl_vae, sdxl.vae)
    paths.ldm_config.write_text(LDM_CONFIG_TEXT, encoding="utf-8")
