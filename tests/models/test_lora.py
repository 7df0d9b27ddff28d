"""LoRA files: ComfyUI merge semantics, agreement with diffusers, both key layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.models.ldm_unet import unet_key_rules
from diffsplit.engine.models.lora import (
    LoraWeights,
    apply_lora,
    flat_module_name,
    load_lora,
    lora_state_dict,
    save_lora,
)
from diffsplit.engine.types import DiffusionModel, TextEncoders
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

SD15_LORA = Path("loras/tiny-sd15-lora.safetensors")
SDXL_LORA = Path("loras/tiny-sdxl-lora.safetensors")


def _unet_output(model: DiffusionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return model.unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


def _text_output(clip: TextEncoders) -> torch.Tensor:
    ids = clip.tokenizers[0](
        "a photo of a cat", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return clip.encoders[0](ids).last_hidden_state


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in module.state_dict().items()}


def _assert_same_state(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float
) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=atol, rtol=0, msg=key)


def _fused_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft-wrapped module's merged weights under the plain module's key names."""
    return {
        key.replace(".base_layer", ""): tensor.clone()
        for key, tensor in module.state_dict().items()
        if ".lora_" not in key
    }


@pytest.fixture(scope="module")
def sd15(models_dir: Path):
    return load_checkpoint(models_dir / "checkpoints/tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def sd15_lora(models_dir: Path) -> LoraWeights:
    return load_lora(models_dir / SD15_LORA)


def test_parses_kohya_file(sd15_lora: LoraWeights) -> None:
    assert sd15_lora.unet and sd15_lora.te1
    assert not sd15_lora.te2
    assert not sd15_lora.ignored_keys
    patch = sd15_lora.unet["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert patch.alpha == 2.0
    assert patch.rank == 4
    assert patch.scale == 0.5
    assert "text_model_encoder_layers_0_self_attn_q_proj" in sd15_lora.te1


def test_strength_zero_returns_the_same_objects(sd15, sd15_lora: LoraWeights) -> None:
    model, clip = apply_lora(sd15.model, sd15.clip, sd15_lora, 0.0, 0.0)
    assert model is sd15.model
    assert clip is sd15.clip


def test_merge_changes_outputs_and_never_the_base(sd15, sd15_lora: LoraWeights) -> None:
    unet_before, text_before = _state(sd15.model.unet), _state(sd15.clip.encoders[0])
    base_unet_out, base_text_out = _unet_output(sd15.model), _text_output(sd15.clip)

    model, clip = apply_lora(sd15.model, sd15.clip, sd15_lora, 0.8, 0.5)

    assert model is not sd15.model and model.unet is not sd15.model.unet
    assert clip is not sd15.clip and clip.tokenizers == sd15.clip.tokenizers
    assert not torch.allclose(_unet_output(model), base_unet_out)
    assert not torch.allclose(_text_output(clip), base_text_out)
    _assert_same_state(_state(sd15.model.unet), unet_before, atol=0)
    _assert_same_state(_state(sd15.clip.encoders[0]), text_before, atol=0)
    torch.testing.assert_close(_unet_output(sd15.model), base_unet_out, atol=0, rtol=0)
    # The conv LoRA is merged too, and unpatched weights are shared with the base, not copied.
    assert not torch.equal(
        model.unet.down_blocks[0].resnets[0].conv1.weight, unet_before["down_blocks.0.resnets.0.conv1.weight"]
    )
    assert model.unet.conv_in.weight.data_ptr() == sd15.model.unet.conv_in.weight.data_ptr()


def test_one_part_at_zero_strength_is_kept(sd15, sd15_lora: LoraWeights) -> None:
    model, clip = apply_lora(sd15.model, sd15.clip, sd15_lora, 1.0, 0.0)
    assert model is not sd15.model
    assert clip is sd15.clip
    model, clip = apply_lora(None, sd15.clip, sd15_lora, 1.0, 1.0)
    assert model is None
    assert clip is not sd15.clip


def test_matches_diffusers_fuse_for_sd15(models_dir: Path, sd15_lora: LoraWeights) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers/tiny-sd15", local_files_only=True)
    model = DiffusionModel(unet=pipe.unet, family="sd15")
    clip = TextEncoders(encoders=(pipe.text_encoder,), tokenizers=(pipe.tokenizer,), family="sd15")
    merged_model, merged_clip = apply_lora(model, clip, sd15_lora, 0.7, 0.7)

    pipe.load_lora_weights(models_dir / SD15_LORA)
    pipe.fuse_lora(lora_scale=0.7)

    _assert_same_state(_state(merged_model.unet), _fused_state(pipe.unet), atol=1e-5)
    _assert_same_state(_state(merged_clip.encoders[0]), _fused_state(pipe.text_encoder), atol=1e-5)


def test_matches_diffusers_fuse_for_sdxl_text_encoders(models_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(
        models_dir / "diffusers/tiny-sdxl", local_files_only=True
    )
    clip = TextEncoders(
        encoders=(pipe.text_encoder, pipe.text_encoder_2),
        tokenizers=(pipe.tokenizer, pipe.tokenizer_2),
        family="sdxl",
    )
    lora = load_lora(models_dir / SDXL_LORA)
    assert lora.te1 and lora.te2
    model, merged = apply_lora(DiffusionModel(unet=pipe.unet, family="sdxl"), clip, lora, 0.9, 0.6)

    pipe.load_lora_weights(models_dir / SDXL_LORA)
    pipe.fuse_lora(lora_scale=0.6, components=["text_encoder", "text_encoder_2"])
    pipe.fuse_lora(lora_scale=0.9, components=["unet"])

    _assert_same_state(_state(merged.encoders[0]), _fused_state(pipe.text_encoder), atol=1e-5)
    _assert_same_state(_state(merged.encoders[1]), _fused_state(pipe.text_encoder_2), atol=1e-5)
    _assert_same_state(_state(model.unet), _fused_state(pipe.unet), atol=1e-5)


def test_reads_files_saved_by_diffusers(
    models_dir: Path, sd15, sd15_lora: LoraWeights, tmp_path: Path
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers/tiny-sd15", local_files_only=True)
    pipe.load_lora_weights(models_dir / SD15_LORA, adapter_name="style")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="style"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="style"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["style"].to_dict(),
    )
    (saved,) = tmp_path.glob("*.safetensors")
    peft_lora = load_lora(saved)
    assert peft_lora.unet.keys() == sd15_lora.unet.keys()
    assert {patch.alpha for patch in peft_lora.unet.values()} == {2.0}

    expected_model, expected_clip = apply_lora(sd15.model, sd15.clip, sd15_lora, 0.5, 0.5)
    model, clip = apply_lora(sd15.model, sd15.clip, peft_lora, 0.5, 0.5)
    _assert_same_state(_state(model.unet), _state(expected_model.unet), atol=0)
    _assert_same_state(_state(clip.encoders[0]), _state(expected_clip.encoders[0]), atol=0)


def test_ldm_named_unet_keys_resolve(models_dir: Path) -> None:
    """kohya's SDXL LoRAs name UNet layers in the LDM layout (``lora_unet_input_blocks_4_1_...``)."""
    parts = load_checkpoint(models_dir / "checkpoints/tiny-sdxl.safetensors")
    lora = load_lora(models_dir / SDXL_LORA)
    to_ldm = {
        flat_module_name(rule.module_keys[0].removesuffix(".weight")): flat_module_name(
            rule.ldm_key.removesuffix(".weight")
        )
        for rule in unet_key_rules(parts.model.unet.state_dict().keys())
    }
    ldm_lora = LoraWeights(unet={to_ldm[name]: patch for name, patch in lora.unet.items()})
    assert any(name.startswith("input_blocks_") for name in ldm_lora.unet)

    expected, _ = apply_lora(parts.model, None, lora, 1.0, 0.0)
    model, _ = apply_lora(parts.model, None, ldm_lora, 1.0, 0.0)
    _assert_same_state(_state(model.unet), _state(expected.unet), atol=0)


def test_unknown_keys_are_reported(sd15, sd15_lora: LoraWeights, caplog: pytest.LogCaptureFixture) -> None:
    patch = next(iter(sd15_lora.unet.values()))
    lora = LoraWeights(unet={**sd15_lora.unet, "no_such_module": patch}, te1=sd15_lora.te1)
    with caplog.at_level(logging.WARNING, logger="diffsplit.engine.models.lora"):
        model, _ = apply_lora(sd15.model, sd15.clip, lora, 1.0, 1.0)
    assert model is not sd15.model
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    total = len(lora.unet) + len(lora.te1)
    assert f"LoRA: 1 of {total} keys did not load" in messages[0] and "no_such_module" in messages[0]


def test_sd15_lora_on_sdxl_reports_in_one_line_instead_of_failing(models_dir: Path, sd15_lora, caplog):
    sdxl = load_checkpoint(models_dir / "checkpoints/tiny-sdxl.safetensors")
    with caplog.at_level(logging.WARNING, logger="diffsplit.engine"):
        source = "node 10 (LoraLoader): LoRA 'x'"
        _, clip = apply_lora(sdxl.model, sdxl.clip, sd15_lora, 1.0, 1.0, source=source)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith("node 10 (LoraLoader): LoRA 'x': ")
    assert "keys did not load (the LoRA does not fit this model)" in messages[0]
    # Its CLIP-L patches fit SDXL's first text encoder; the second one is left alone.
    assert clip.encoders[0] is not sdxl.clip.encoders[0]
    assert clip.encoders[1] is sdxl.clip.encoders[1]


def test_save_round_trip_is_deterministic(sd15_lora: LoraWeights, tmp_path: Path) -> None:
    save_lora(tmp_path / "a.safetensors", sd15_lora)
    save_lora(tmp_path / "b.safetensors", sd15_lora)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    again = load_lora(tmp_path / "a.safetensors")
    expected = lora_state_dict(sd15_lora)
    actual = lora_state_dict(again)
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in expected)


def test_file_without_lora_weights_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-lora.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelFileError, match="no LoRA weights"):
        load_lora(path)
    with pytest.raises(ModelFileError, match="cannot read"):
        load_lora(tmp_path / "missing.safetensors")


def test_modules_with_parts_we_cannot_merge_are_skipped_whole(sd15_lora: LoraWeights, tmp_path: Path) -> None:
    tensors = lora_state_dict(sd15_lora)
    locon = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors[f"{locon}.lora_mid.weight"] = torch.ones(4, 4, 3, 3)
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(1)
    path = tmp_path / "locon.safetensors"
    save_file(tensors, str(path))

    lora = load_lora(path)

    assert "down_blocks_0_resnets_0_conv1" not in lora.unet
    assert f"{locon}.lora_mid.weight" in lora.ignored_keys
    assert f"{locon}.lora_down.weight" in lora.ignored_keys
    assert len(lora.unet) == len(sd15_lora.unet) - 1
