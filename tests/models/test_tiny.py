"""The tiny model set: exact layout, determinism, loadable by diffusers and by our loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint, load_controlnet, load_vae
from diffsplit.engine.models.tiny import TinyModelSet, describe, tiny_checkpoint_parts, write_tiny_models
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

EXPECTED_FILES = (
    "checkpoints/tiny-sd15.safetensors",
    "checkpoints/tiny-sdxl.safetensors",
    "checkpoints/tiny-sdxl-refiner.safetensors",
    "loras/tiny-sd15-lora.safetensors",
    "loras/tiny-sdxl-lora.safetensors",
    "vae/tiny-vae.safetensors",
    "controlnet/tiny-sd15-controlnet.safetensors",
    "diffusers/tiny-sd15/model_index.json",
    "diffusers/tiny-sdxl/model_index.json",
)


def _files(root: Path) -> dict[str, bytes]:
    """The model files under ``root`` (hidden files such as a store's hash index left out)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


def _generate(pipe, steps: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    result = pipe("a photo of a cat", num_inference_steps=steps, generator=generator, output_type="np")
    return result.images


@pytest.fixture(scope="module")
def second_set(tmp_path_factory: pytest.TempPathFactory) -> TinyModelSet:
    """The set written again with seed 0, to compare bytes with the session's set."""
    return write_tiny_models(tmp_path_factory.mktemp("again"), seed=0)


def test_files_have_the_exact_names(models_dir: Path) -> None:
    for name in EXPECTED_FILES:
        assert (models_dir / name).is_file(), name
    for folder in ("diffusers/tiny-sd15", "diffusers/tiny-sdxl"):
        assert (models_dir / folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (models_dir / folder / "tokenizer" / "vocab.json").is_file()
    assert (models_dir / "diffusers/tiny-sdxl/tokenizer_2/merges.txt").is_file()
    assert not list(models_dir.rglob("*.bin"))


def test_same_seed_gives_identical_bytes(models_dir: Path, second_set: TinyModelSet) -> None:
    first, second = _files(models_dir), _files(second_set.root)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_other_seed_gives_other_weights(second_set: TinyModelSet, tmp_path: Path) -> None:
    other = write_tiny_models(tmp_path, seed=1)
    for field in ("sd15_checkpoint", "sdxl_checkpoint", "sdxl_refiner_checkpoint", "sd15_lora", "vae"):
        assert getattr(other, field).read_bytes() != getattr(second_set, field).read_bytes(), field


def test_describe_lists_every_file(second_set: TinyModelSet) -> None:
    text = describe(second_set)
    for path in second_set.paths():
        assert path.relative_to(second_set.root).as_posix() in text
    assert text.count(" MB") == len(second_set.paths())


def test_sd15_folder_stays_finite_through_20_steps(models_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers/tiny-sd15", local_files_only=True)
    assert pipe.safety_checker is None
    image = _generate(pipe, steps=20)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05


def test_sdxl_folder_loads_offline_and_generates(models_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(
        models_dir / "diffusers/tiny-sdxl", local_files_only=True
    )
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.tokenizer_2.pad_token_id == 0
    image = _generate(pipe, steps=2)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05


@pytest.mark.parametrize(
    ("family", "pipeline_cls"), [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)]
)
def test_single_file_and_folder_hold_the_same_weights(models_dir: Path, family: str, pipeline_cls) -> None:
    parts = load_checkpoint(models_dir / f"checkpoints/tiny-{family}.safetensors")
    pipe = pipeline_cls.from_pretrained(models_dir / f"diffusers/tiny-{family}", local_files_only=True)
    assert _same_tensors(parts.model.unet.state_dict(), pipe.unet.state_dict())
    assert _same_tensors(parts.vae.model.state_dict(), pipe.vae.state_dict())
    folder_encoders = (pipe.text_encoder,) if family == "sd15" else (pipe.text_encoder, pipe.text_encoder_2)
    for loaded, folder in zip(parts.clip.encoders, folder_encoders, strict=True):
        assert _same_tensors(loaded.state_dict(), folder.state_dict())
    assert parts.vae.scaling_factor == pipe.vae.config.scaling_factor


def test_checkpoints_round_trip_the_in_memory_models(models_dir: Path) -> None:
    expected = tiny_checkpoint_parts("sdxl_refiner", seed=0)
    loaded = load_checkpoint(models_dir / "checkpoints/tiny-sdxl-refiner.safetensors")
    assert loaded.model.family == "sdxl_refiner"
    assert _same_tensors(loaded.model.unet.state_dict(), expected.model.unet.state_dict())
    assert _same_tensors(loaded.clip.encoders[0].state_dict(), expected.clip.encoders[0].state_dict())


def test_standalone_vae_differs_from_the_checkpoint_vae(models_dir: Path) -> None:
    vae = load_vae(models_dir / "vae/tiny-vae.safetensors")
    checkpoint_vae = load_checkpoint(models_dir / "checkpoints/tiny-sd15.safetensors").vae
    standalone, bundled = vae.model.state_dict(), checkpoint_vae.model.state_dict()
    assert standalone.keys() == bundled.keys()
    assert not torch.equal(standalone["decoder.conv_out.weight"], bundled["decoder.conv_out.weight"])
    image = vae.model.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_controlnet_fits_the_sd15_unet_and_changes_its_output(models_dir: Path) -> None:
    controlnet = load_controlnet(models_dir / "controlnet/tiny-sd15-controlnet.safetensors").model
    unet = load_checkpoint(models_dir / "checkpoints/tiny-sd15.safetensors").model.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 64, generator=generator)
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        down, mid = controlnet(sample, timestep, context, controlnet_cond=hint, return_dict=False)
        plain = unet(sample, timestep, context).sample
        controlled = unet(
            sample, timestep, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert all(residual.abs().max() > 0 for residual in (*down, mid))
    assert torch.isfinite(controlled).all()
    assert not torch.allclose(plain, controlled)


def test_no_layer_is_left_at_zero() -> None:
    parts = tiny_checkpoint_parts("sd15", seed=0)
    for module in (parts.model.unet, parts.vae.model, *parts.clip.encoders):
        zero = [name for name, param in module.named_parameters() if param.ndim > 1 and not param.abs().sum()]
        assert zero == []
    assert parts.model.unet.conv_out.weight.std() > 0


def test_building_models_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    tiny_checkpoint_parts("sd15", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_lora_loads_in_diffusers_and_changes_the_image(models_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers/tiny-sd15", local_files_only=True)
    base = _generate(pipe, steps=2)
    pipe.load_lora_weights(models_dir / "loras/tiny-sd15-lora.safetensors")
    with_lora = _generate(pipe, steps=2)
    assert np.isfinite(with_lora).all()
    assert np.abs(with_lora - base).max() > 0.01
