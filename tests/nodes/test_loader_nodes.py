"""CheckpointLoaderSimple, LoraLoader(ModelOnly), VAELoader and CLIPSetLastLayer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.nodes.loaders import (
    CHECKPOINT_LOADER_SIMPLE,
    CLIP_SET_LAST_LAYER,
    LORA_LOADER,
    LORA_LOADER_MODEL_ONLY,
    NODES,
    VAE_LOADER,
)
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import DiffusionModel, TextEncoders, Vae


@dataclass
class StoreContext:
    """The part of a NodeContext that loader nodes use: model files from a real store."""

    store: ModelStore
    node_id: str = "1"

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)


@pytest.fixture
def context(models_dir: Path, tmp_path: Path) -> StoreContext:
    return StoreContext(ModelStore(models_dir, index_path=tmp_path / "index.json"))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _same_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(tensor, weights[name]) for name, tensor in module.state_dict().items())


@pytest.mark.parametrize(
    ("name", "family", "encoder_count"),
    [("tiny-sd15.safetensors", "sd15", 1), ("tiny-sdxl.safetensors", "sdxl", 2),
     ("tiny-sdxl-refiner.safetensors", "sdxl_refiner", 1)],
)  # fmt: skip
def test_checkpoint_loader_returns_model_clip_vae(
    context: StoreContext, name: str, family: str, encoder_count: int
) -> None:
    model, clip, vae = CHECKPOINT_LOADER_SIMPLE.function(context, ckpt_name=name)
    assert isinstance(model, DiffusionModel) and model.family == family
    assert isinstance(clip, TextEncoders) and clip.family == family and len(clip.encoders) == encoder_count
    assert isinstance(vae, Vae) and vae.scaling_factor > 0


def test_checkpoint_loader_reports_a_missing_file(context: StoreContext) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        CHECKPOINT_LOADER_SIMPLE.function(context, ckpt_name="nope.safetensors")


def test_lora_loader_at_zero_returns_inputs_and_otherwise_new_objects(context: StoreContext) -> None:
    model, clip, _ = CHECKPOINT_LOADER_SIMPLE.function(context, ckpt_name="tiny-sd15.safetensors")
    unet_before = _weights(model.unet)
    encoder_before = _weights(clip.encoders[0])
    lora_name = "tiny-sd15-lora.safetensors"
    untouched = LORA_LOADER.function(
        context, model=model, clip=clip, lora_name=lora_name, strength_model=0.0, strength_clip=0.0
    )
    assert untouched[0] is model and untouched[1] is clip
    new_model, new_clip = LORA_LOADER.function(
        context, model=model, clip=clip, lora_name=lora_name, strength_model=0.7, strength_clip=1.0
    )
    assert new_model is not model and new_clip is not clip
    assert not _same_weights(new_model.unet, unet_before)
    assert not _same_weights(new_clip.encoders[0], encoder_before)
    assert _same_weights(model.unet, unet_before) and _same_weights(clip.encoders[0], encoder_before)


def test_lora_loader_model_only_patches_the_unet(context: StoreContext) -> None:
    model, _, _ = CHECKPOINT_LOADER_SIMPLE.function(context, ckpt_name="tiny-sdxl.safetensors")
    unet_before = _weights(model.unet)
    (patched,) = LORA_LOADER_MODEL_ONLY.function(
        context, model=model, lora_name="tiny-sdxl-lora.safetensors", strength_model=1.0
    )
    assert patched.family == "sdxl" and not _same_weights(patched.unet, unet_before)
    assert _same_weights(model.unet, unet_before)
    (same,) = LORA_LOADER_MODEL_ONLY.function(
        context, model=model, lora_name="tiny-sdxl-lora.safetensors", strength_model=0.0
    )
    assert same is model


def test_vae_loader(context: StoreContext) -> None:
    (vae,) = VAE_LOADER.function(context, vae_name="tiny-vae.safetensors")
    assert isinstance(vae, Vae)
    assert vae.scaling_factor == pytest.approx(0.18215)
    latent = torch.zeros((1, 4, 2, 2))
    with torch.no_grad():
        assert vae.model.decode(latent).sample.shape == (1, 3, 16, 16)


def test_clip_set_last_layer_returns_a_new_clip(context: StoreContext) -> None:
    _, clip, _ = CHECKPOINT_LOADER_SIMPLE.function(context, ckpt_name="tiny-sd15.safetensors")
    (stopped,) = CLIP_SET_LAST_LAYER.function(context, clip=clip, stop_at_clip_layer=-2)
    assert stopped.layer_idx == -2 and clip.layer_idx is None
    assert stopped.encoders[0] is clip.encoders[0]


def test_declarations_match_comfyui() -> None:
    assert all(node.is_loader for node in NODES)
    assert [spec.name for spec in LORA_LOADER.inputs] == [
        "model", "clip", "lora_name", "strength_model", "strength_clip",
    ]  # fmt: skip
    strength = LORA_LOADER.input("strength_clip")
    assert (strength.default, strength.min, strength.max, strength.step) == (1.0, -100.0, 100.0, 0.01)
    assert CHECKPOINT_LOADER_SIMPLE.input("ckpt_name").model_folder == "checkpoints"
    assert LORA_LOADER_MODEL_ONLY.input("lora_name").model_folder == "loras"
    assert VAE_LOADER.input("vae_name").model_folder == "vae"
    layer = CLIP_SET_LAST_LAYER.input("stop_at_clip_layer")
    assert (layer.default, layer.min, layer.max) == (-1, -24, -1)
    assert [output.type for output in CHECKPOINT_LOADER_SIMPLE.outputs] == ["MODEL", "CLIP", "VAE"]
