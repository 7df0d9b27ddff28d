"""Config inference against the real published SD 1.5 / SDXL / refiner configs.

Full-size modules are built on the meta device (no weights allocated), mapped
to LDM key shapes with the same rules the saver uses, and inference must give
back the published config: every init argument, not just the ones it sets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models import infer_config as infer
from diffsplit.engine.models.checkpoint import UNET_PREFIX, detect_family, infer_checkpoint_configs
from diffsplit.engine.models.ldm_controlnet import controlnet_key_rules
from diffsplit.engine.models.ldm_keys import ldm_shapes_of, module_shapes_of
from diffsplit.engine.models.ldm_text import clip_l_key_rules, open_clip_key_rules
from diffsplit.engine.models.ldm_unet import unet_key_rules
from diffsplit.engine.models.ldm_vae import LDM_VAE_PREFIX, vae_key_rules
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
REFINER_UNET = {
    "sample_size": 128,
    "block_out_channels": (384, 768, 1536, 1536),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": 4,
    "cross_attention_dim": 1280,
    "attention_head_dim": (6, 12, 24, 24),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,
}
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_L = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu", **TOKEN_IDS,
}  # fmt: skip
CLIP_G = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "projection_dim": 1280, "hidden_act": "gelu", **TOKEN_IDS,
}  # fmt: skip
SDXL_CONTROLNET = {key: SDXL_UNET[key] for key in SDXL_UNET if key not in ("sample_size", "up_block_types")}


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def ldm_shapes(module: torch.nn.Module, rules_for, prefix: str = "") -> dict[str, tuple[int, ...]]:
    shapes = module_shapes_of(module)
    return {prefix + key: shape for key, shape in ldm_shapes_of(rules_for(shapes), shapes).items()}


def assert_recovers(cls: type, module: torch.nn.Module, inferred: dict) -> None:
    """Inference matches every init argument of the published config."""
    assert infer.diffusers_overrides(cls, module.config, inferred) == {}
    rebuilt = on_meta(lambda: cls(**inferred))
    assert module_shapes_of(rebuilt) == module_shapes_of(module)


@pytest.mark.parametrize(
    ("family", "config", "pooled_dim"),
    [("sd15", SD15_UNET, None), ("sdxl", SDXL_UNET, 1280), ("sdxl_refiner", REFINER_UNET, 1280)],
)
def test_full_size_unet_config_is_recovered_from_ldm_shapes(family, config, pooled_dim) -> None:
    unet = on_meta(lambda: UNet2DConditionModel(**config))
    shapes = ldm_shapes(unet, unet_key_rules)
    assert "input_blocks.0.0.weight" in shapes and "out.2.weight" in shapes
    assert_recovers(
        UNet2DConditionModel, unet, infer.infer_unet_config(shapes, family, pooled_dim=pooled_dim)
    )


def test_sdxl_ldm_keys_follow_the_original_numbering() -> None:
    shapes = ldm_shapes(on_meta(lambda: UNet2DConditionModel(**SDXL_UNET)), unet_key_rules)
    # Level 0: blocks 1-2 resnets, 3 downsampler; level 2 (1280, depth 10): blocks 7-8.
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after attention
    assert shapes["output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert "output_blocks.8.0.skip_connection.weight" in shapes
    assert not any(key.startswith("output_blocks.9.") for key in shapes)


def test_full_size_sdxl_checkpoint_configs_are_recovered() -> None:
    unet = on_meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    vae = on_meta(lambda: AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025))
    clip_l = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    clip_g = on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    shapes = {
        **ldm_shapes(unet, unet_key_rules, UNET_PREFIX),
        **ldm_shapes(vae, vae_key_rules, LDM_VAE_PREFIX),
        **ldm_shapes(clip_l, clip_l_key_rules, "conditioner.embedders.0.transformer."),
        **ldm_shapes(clip_g, open_clip_key_rules, "conditioner.embedders.1.model."),
    }
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (
        3840,
        1280,
    )
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert detect_family(shapes) == "sdxl"
    configs = infer_checkpoint_configs(shapes, "sdxl", Path("sdxl.safetensors"))
    assert_recovers(UNet2DConditionModel, unet, configs["unet"])
    assert_recovers(AutoencoderKL, vae, configs["vae"])
    assert infer.clip_overrides(clip_l.config.to_dict(), configs["clip_l"]) == {}
    assert infer.clip_overrides(clip_g.config.to_dict(), configs["clip_g"]) == {}


def test_sd15_text_encoder_and_vae_configs_are_recovered() -> None:
    clip_l = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    vae = on_meta(lambda: AutoencoderKL(**SD_VAE, sample_size=512))
    assert (
        infer.clip_overrides(
            clip_l.config.to_dict(), infer.infer_clip_l_config(ldm_shapes(clip_l, clip_l_key_rules))
        )
        == {}
    )
    assert_recovers(AutoencoderKL, vae, infer.infer_vae_config(ldm_shapes(vae, vae_key_rules), "sd15"))


@pytest.mark.parametrize(
    "config",
    [{"cross_attention_dim": 768}, SDXL_CONTROLNET],
    ids=["sd15", "sdxl"],
)
def test_full_size_controlnet_config_is_recovered(config) -> None:
    controlnet = on_meta(lambda: ControlNetModel(**config))
    shapes = ldm_shapes(controlnet, controlnet_key_rules)
    assert shapes["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert shapes["zero_convs.0.0.weight"] == (320, 320, 1, 1)
    assert "middle_block_out.0.weight" in shapes
    assert_recovers(ControlNetModel, controlnet, infer.infer_controlnet_config(shapes))


def test_unet_without_cross_attention_is_rejected() -> None:
    unet = on_meta(
        lambda: UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
        )
    )
    with pytest.raises(ModelFileError, match="cross-attention"):
        infer.infer_unet_config(ldm_shapes(unet, unet_key_rules), "sd15")


def test_overrides_round_trip_through_metadata() -> None:
    entries = infer.write_overrides("unet", {"sample_size": 8, "attention_head_dim": (1, 2)})
    assert infer.read_overrides(entries, "unet") == {"sample_size": 8, "attention_head_dim": [1, 2]}
    assert infer.write_overrides("unet", {}) == {}
    with pytest.raises(ModelFileError, match=r"diffsplit\.vae"):
        infer.read_overrides({"diffsplit.vae": "[1, 2]"}, "vae")
