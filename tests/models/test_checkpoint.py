"""Single-file checkpoints: LDM layout round trips, standalone VAE/ControlNet, errors.

Small seeded modules are built directly with the diffusers/transformers
classes, following the family rules (heads, token ids...) so that the files
need no config metadata; saving then loading must give bit-identical state
dicts and forward outputs.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import (
    CheckpointParts,
    detect_family,
    load_checkpoint,
    load_controlnet,
    load_vae,
    save_checkpoint,
    save_controlnet,
    save_vae,
)
from diffsplit.engine.types import ControlNet, DiffusionModel, ModelSampling, TextEncoders, Vae
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TIME_IDS = {"sd15": 0, "sdxl": 6, "sdxl_refiner": 5}
CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "hidden_act": "quick_gelu", "projection_dim": 64}
CLIP_G = {"hidden_size": 128, "intermediate_size": 256, "hidden_act": "gelu", "projection_dim": 128}


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded non-zero weights everywhere (library inits leave some layers at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module.eval()


def clip(kind: str, seed: int) -> torch.nn.Module:
    config = CLIPTextConfig(
        **(CLIP_L if kind == "clip_l" else CLIP_G),
        num_hidden_layers=2,
        num_attention_heads=(64 if kind == "clip_l" else 128) // 64,
        vocab_size=49408,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cls = CLIPTextModel if kind == "clip_l" else CLIPTextModelWithProjection
    return randomized(cls(config), seed)


def unet(family: str, seed: int, layers_per_block: int = 2) -> UNet2DConditionModel:
    if family == "sd15":
        config = {
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "sample_size": 64,
        }
    elif family == "sdxl":
        config = {
            "block_out_channels": (32, 64, 128),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (1, 1, 2),
            "cross_attention_dim": 64 + 128,
            "projection_class_embeddings_input_dim": 128 + 6 * 8,
        }
    else:
        config = {
            "block_out_channels": (32, 64, 128, 128),
            "down_block_types": (
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": 2,
            "attention_head_dim": (1, 1, 2, 2),
            "cross_attention_dim": 128,
            "projection_class_embeddings_input_dim": 128 + 5 * 8,
        }
    if family != "sd15":
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            use_linear_projection=True,
            sample_size=128,
        )
    return randomized(UNet2DConditionModel(**config, layers_per_block=layers_per_block), seed)


def vae(scaling_factor: float, sample_size: int, seed: int) -> AutoencoderKL:
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )
    return randomized(model, seed)


@functools.cache
def checkpoint_parts(family: str, layers_per_block: int = 2) -> CheckpointParts:
    """Seeded tiny parts of ``family`` (cached: tests only read them)."""
    kinds = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g"), "sdxl_refiner": ("clip_g",)}[family]
    scale, size = (0.18215, 512) if family == "sd15" else (0.13025, 1024)
    return CheckpointParts(
        model=DiffusionModel(unet=unet(family, 1, layers_per_block), family=family),
        clip=TextEncoders(
            encoders=tuple(clip(kind, 2 + i) for i, kind in enumerate(kinds)), tokenizers=(), family=family
        ),
        vae=Vae(model=vae(scale, size, 4), scaling_factor=scale),
    )


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert not actual.training
    assert not any(param.requires_grad for param in actual.parameters())


def unet_output(model: UNet2DConditionModel, family: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    cross = model.config.cross_attention_dim
    kwargs = {}
    if family != "sd15":
        pooled = model.config.projection_class_embeddings_input_dim - TIME_IDS[family] * 8
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0][: TIME_IDS[family]]]),
        }
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, cross, generator=generator)
    with torch.no_grad():
        return model(sample, 10, encoder_hidden_states=context, **kwargs).sample


def vae_outputs(model: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latent = model.encode(image).latent_dist.mean
        return latent, model.decode(latent).sample


def text_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 4])
    with torch.no_grad():
        output = model(ids)
    return [tensor for tensor in output.to_tuple() if isinstance(tensor, torch.Tensor)]


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sdxl_refiner"])
def round_trip(request, tmp_path_factory) -> tuple[str, CheckpointParts, CheckpointParts, Path]:
    family = request.param
    parts = checkpoint_parts(family)
    path = tmp_path_factory.mktemp("ckpt") / f"{family}.safetensors"
    save_checkpoint(path, parts, metadata={"note": "tiny"})
    return family, parts, load_checkpoint(path), path


def test_checkpoint_round_trip_gives_identical_weights(round_trip) -> None:
    family, parts, loaded, _ = round_trip
    assert loaded.model.family == loaded.clip.family == family
    assert_same_weights(parts.model.unet, loaded.model.unet)
    assert_same_weights(parts.vae.model, loaded.vae.model)
    assert [type(e) for e in loaded.clip.encoders] == [type(e) for e in parts.clip.encoders]
    for original, reloaded in zip(parts.clip.encoders, loaded.clip.encoders, strict=True):
        assert_same_weights(original, reloaded)
    assert loaded.vae.scaling_factor == parts.vae.scaling_factor
    assert len(loaded.clip.tokenizers) == len(loaded.clip.encoders)


def test_checkpoint_round_trip_gives_identical_outputs(round_trip) -> None:
    family, parts, loaded, _ = round_trip
    assert torch.equal(unet_output(loaded.model.unet, family), unet_output(parts.model.unet, family))
    for want, got in zip(vae_outputs(parts.vae.model), vae_outputs(loaded.vae.model), strict=True):
        assert torch.equal(got, want)
    for original, reloaded in zip(parts.clip.encoders, loaded.clip.encoders, strict=True):
        for want, got in zip(text_outputs(original), text_outputs(reloaded), strict=True):
            assert torch.equal(got, want)


def test_family_rule_modules_need_no_config_metadata(round_trip) -> None:
    _, _, _, path = round_trip
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"note": "tiny"}


def test_checkpoint_uses_the_original_ldm_keys(round_trip) -> None:
    family, _, _, path = round_trip
    with safe_open(str(path), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert detect_family(shapes) == family
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    # LDM numbers decoder levels from the full-resolution end: up.3 is the first to run.
    assert shapes["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["first_stage_model.decoder.up.1.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)
    assert shapes["first_stage_model.decoder.up.0.block.0.conv1.weight"] == (32, 32, 3, 3)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in shapes
    if family == "sd15":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in shapes  # no attention at level 0
    else:
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        assert shapes[prefix + "transformer.resblocks.1.attn.in_proj_weight"] == (384, 128)
        assert shapes[prefix + "text_projection"] == (128, 128)
        assert shapes[prefix + "positional_embedding"] == (77, 128)
        assert "model.diffusion_model.label_emb.0.2.weight" in shapes
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in shapes  # attention, then upsampler


def test_layout_matches_diffusers_own_single_file_converters(round_trip) -> None:
    """An independent oracle: diffusers' LDM converters read our files into the same weights."""
    from diffusers.loaders import single_file_utils as reference

    family, parts, _, path = round_trip
    ldm = load_file(path)
    converted = [
        (parts.model.unet, reference.convert_ldm_unet_checkpoint(ldm, dict(parts.model.unet.config))),
        (parts.vae.model, reference.convert_ldm_vae_checkpoint(ldm, dict(parts.vae.model.config))),
    ]
    if family != "sd15":
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        open_clip = parts.clip.encoders[-1]
        converted.append((open_clip, reference.convert_open_clip_checkpoint(open_clip, ldm, prefix=prefix)))
    for module, state in converted:
        expected = module.state_dict()
        assert set(state) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("layers_per_block", [1, 3])
def test_any_resnet_count_per_level_round_trips(tmp_path, layers_per_block) -> None:
    parts = checkpoint_parts("sd15", layers_per_block)
    save_checkpoint(tmp_path / "m.safetensors", parts)
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.model.unet.config.layers_per_block == layers_per_block
    assert torch.equal(unet_output(loaded.model.unet, "sd15"), unet_output(parts.model.unet, "sd15"))


def test_non_family_config_values_travel_as_metadata(tmp_path) -> None:
    parts = checkpoint_parts("sd15")
    odd_unet = randomized(UNet2DConditionModel(**{**parts.model.unet.config, "attention_head_dim": 2}), 5)
    odd = CheckpointParts(
        model=DiffusionModel(
            unet=odd_unet, family="sd15", sampling=ModelSampling(prediction_type="v_prediction")
        ),
        clip=parts.clip,
        vae=Vae(model=parts.vae.model, scaling_factor=0.5),
    )
    save_checkpoint(tmp_path / "odd.safetensors", odd)
    loaded = load_checkpoint(tmp_path / "odd.safetensors")
    assert loaded.model.unet.config.attention_head_dim == 2
    assert loaded.model.sampling.prediction_type == "v_prediction"
    assert loaded.vae.scaling_factor == 0.5
    assert torch.equal(unet_output(loaded.model.unet, "sd15"), unet_output(odd_unet, "sd15"))


def test_load_converts_dtype(round_trip) -> None:
    _, _, _, path = round_trip
    half = load_checkpoint(path, dtype=torch.float16)
    assert {p.dtype for p in half.model.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in half.clip.encoders[0].parameters()} == {torch.float16}


def test_missing_weights_name_the_file_and_keys(tmp_path) -> None:
    save_checkpoint(tmp_path / "full.safetensors", checkpoint_parts("sd15"))
    tensors = load_file(tmp_path / "full.safetensors")
    gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del tensors[gone]
    save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(ModelFileError, match=r"broken\.safetensors") as raised:
        load_checkpoint(tmp_path / "broken.safetensors")
    assert gone in str(raised.value)


def test_pickled_ckpt_files_load_like_safetensors(tmp_path) -> None:
    parts = checkpoint_parts("sd15")
    save_checkpoint(tmp_path / "m.safetensors", parts)
    torch.save({"state_dict": load_file(tmp_path / "m.safetensors")}, tmp_path / "m.ckpt")
    loaded = load_checkpoint(tmp_path / "m.ckpt")
    assert_same_weights(parts.model.unet, loaded.model.unet)
    assert_same_weights(parts.clip.encoders[0], loaded.clip.encoders[0])


def test_unknown_architecture_is_rejected(tmp_path) -> None:
    sd2_like = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(10, 8),
    }
    save_file(sd2_like, tmp_path / "sd2.safetensors")
    with pytest.raises(ModelFileError, match=r"sd2\.safetensors.*unknown architecture"):
        load_checkpoint(tmp_path / "sd2.safetensors")
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match="unknown architecture"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_standalone_vae_round_trips_in_ldm_and_diffusers_keys(tmp_path) -> None:
    original = Vae(model=vae(0.13025, 512, 9), scaling_factor=0.13025)
    save_vae(tmp_path / "vae.safetensors", original)
    assert "encoder.down.0.block.0.conv1.weight" in load_file(tmp_path / "vae.safetensors")
    save_file(original.model.state_dict(), tmp_path / "diffusers_vae.safetensors")
    for name in ("vae.safetensors", "diffusers_vae.safetensors"):
        loaded = load_vae(tmp_path / name, scaling_factor=0.13025)
        assert_same_weights(original.model, loaded.model)
        assert loaded.scaling_factor == 0.13025
        for want, got in zip(vae_outputs(original.model), vae_outputs(loaded.model), strict=True):
            assert torch.equal(got, want)
    assert load_vae(tmp_path / "vae.safetensors").scaling_factor == 0.13025  # kept as metadata
    save_file({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, tmp_path / "cn.safetensors")
    with pytest.raises(ModelFileError, match="not a vae file"):
        load_vae(tmp_path / "cn.safetensors")


def tiny_controlnet(family: str, seed: int) -> ControlNetModel:
    allowed = inspect.signature(ControlNetModel.__init__).parameters
    kept = {key: value for key, value in unet(family, 0).config.items() if key in allowed}
    return randomized(ControlNetModel(**kept, conditioning_embedding_out_channels=(16, 32, 32, 64)), seed)


def controlnet_output(model: ControlNetModel, family: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 128, generator=generator),
            "time_ids": torch.ones(1, 6),
        }
    with torch.no_grad():
        down, mid = model(
            torch.randn(1, 4, 8, 8, generator=generator),
            10,
            encoder_hidden_states=torch.randn(1, 5, model.config.cross_attention_dim, generator=generator),
            controlnet_cond=torch.rand(1, 3, 64, 64, generator=generator),
            return_dict=False,
            **kwargs,
        )
    return [*down, mid]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_round_trips_in_every_key_layout(tmp_path, family) -> None:
    original = tiny_controlnet(family, 12)
    save_controlnet(tmp_path / "cn.safetensors", ControlNet(model=original))
    ldm = load_file(tmp_path / "cn.safetensors")
    assert ldm["input_hint_block.14.weight"].shape == (32, 64, 3, 3)
    assert "zero_convs.0.0.weight" in ldm and "middle_block_out.0.weight" in ldm
    save_file({f"control_model.{k}": v for k, v in ldm.items()}, tmp_path / "prefixed.safetensors")
    save_file(original.state_dict(), tmp_path / "diffusers.safetensors")
    with safe_open(str(tmp_path / "cn.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    for name in ("cn.safetensors", "prefixed.safetensors", "diffusers.safetensors"):
        if family == "sdxl" and name != "cn.safetensors":
            # The tiny SDXL ControlNet's add-time width is not SDXL's: only the saved file says it.
            with pytest.raises(ModelFileError, match="addition_time_embed_dim"):
                load_controlnet(tmp_path / name)
            continue
        loaded = load_controlnet(tmp_path / name).model
        assert_same_weights(original, loaded)
        for want, got in zip(
            controlnet_output(original, family), controlnet_output(loaded, family), strict=True
        ):
            assert torch.equal(got, want)
    assert bool(metadata) == (family == "sdxl")
