"""CLIP vision files: the tiny model, both key layouts, config inference, ComfyUI's preprocessing, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    clip_preprocess,
    encode_image,
    load_clip_vision,
    save_clip_vision,
)
from diffsplit.engine.models.ldm_clip_vision import infer_hf_config, infer_open_clip_config
from diffsplit.engine.models.tiny_clip_vision import TINY_CLIP_VISION_FILE, tiny_clip_vision
from diffsplit.engine.types import ClipVision
from safetensors import safe_open
from safetensors.torch import save_file


def _image(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, height, width, channels), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_file(models_dir: Path) -> Path:
    return models_dir / "clip_vision" / TINY_CLIP_VISION_FILE


@pytest.fixture(scope="module")
def loaded(tiny_file: Path) -> ClipVision:
    return load_clip_vision(tiny_file)


def test_the_tiny_file_is_the_transformers_layout_and_loads_the_seeded_weights(
    tiny_file: Path, loaded: ClipVision
) -> None:
    with safe_open(str(tiny_file), "pt") as opened:
        keys = set(opened.keys())
    assert "vision_model.embeddings.class_embedding" in keys and "visual_projection.weight" in keys
    config = loaded.model.config
    assert (config.image_size, config.patch_size, config.projection_dim) == (224, 32, 128)
    assert (config.num_attention_heads, config.hidden_act) == (2, "gelu")  # from the file's metadata
    expected = tiny_clip_vision(seed=0).model.state_dict()
    actual = loaded.model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert all(not tensor.is_meta for tensor in actual.values())


def test_encode_gives_comfyui_outputs_of_the_right_shapes(loaded: ClipVision) -> None:
    out = encode_image(loaded, _image(2, 40, 56))
    assert set(out) == {"image_embeds", "last_hidden_state", "penultimate_hidden_states"}
    assert out["image_embeds"].shape == (2, 128)
    assert out["last_hidden_state"].shape == (2, 50, 64)  # 7 x 7 patches + the class token
    assert out["penultimate_hidden_states"].shape == (2, 50, 64)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in out.values())
    assert not torch.equal(out["image_embeds"][0], out["image_embeds"][1])


def test_penultimate_is_the_second_to_last_layer_and_embeds_the_projected_class_token(
    loaded: ClipVision,
) -> None:
    image = _image(1, 224, 224, seed=3)
    out = encode_image(loaded, image)
    vision = loaded.model.vision_model
    with torch.no_grad():
        pixels = clip_preprocess(image)
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        after_first = vision.encoder.layers[0](hidden, None)
        after_first = after_first[0] if isinstance(after_first, tuple) else after_first
        pooled = vision.post_layernorm(out["last_hidden_state"][:, 0])
        embeds = loaded.model.visual_projection(pooled)
    assert torch.allclose(out["penultimate_hidden_states"], after_first, atol=1e-6)
    assert not torch.allclose(out["penultimate_hidden_states"], out["last_hidden_state"])
    assert torch.allclose(out["image_embeds"], embeds, atol=1e-6)


def _reference_preprocess(image: torch.Tensor, crop: bool) -> torch.Tensor:
    """ComfyUI's steps one by one: antialiased bicubic resize, center crop, 8 bits, CLIP mean/std."""
    _, height, width, _ = image.shape
    if crop:
        scale = 224 / min(height, width)
        new_h, new_w = round(height * scale), round(width * scale)
    else:
        new_h, new_w = 224, 224
    channels_first = image[..., :3].permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        channels_first, size=(new_h, new_w), mode="bicubic", antialias=True
    )
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    cropped = resized[:, :, top : top + 224, left : left + 224]
    quantised = (cropped * 255).clamp(0, 255).round() / 255
    planes = [(quantised[:, c] - CLIP_MEAN[c]) / CLIP_STD[c] for c in range(3)]
    return torch.stack(planes, dim=1)


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("size", [(40, 56), (300, 250), (224, 300)])
def test_preprocess_equals_a_hand_written_reference(crop: bool, size: tuple[int, int]) -> None:
    image = _image(2, *size, channels=4, seed=sum(size))
    actual = clip_preprocess(image, crop=crop)
    assert actual.shape == (2, 3, 224, 224)
    assert torch.allclose(actual, _reference_preprocess(image, crop), atol=1e-5)
    assert torch.equal(actual, clip_preprocess(image[..., :3], crop=crop))  # alpha is dropped


def test_a_224_square_image_is_only_quantised_and_normalised() -> None:
    image = _image(1, 224, 224, seed=5)
    expected = (torch.round(image * 255) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(clip_preprocess(image), expected.permute(0, 3, 1, 2), atol=1e-6)
    assert torch.equal(clip_preprocess(image, crop=True), clip_preprocess(image, crop=False))


def test_crop_modes_differ_on_a_wide_image(loaded: ClipVision) -> None:
    image = _image(1, 60, 120, seed=7)
    center = encode_image(loaded, image, crop=True)["image_embeds"]
    squashed = encode_image(loaded, image, crop=False)["image_embeds"]
    assert not torch.allclose(center, squashed)


def test_the_open_clip_layout_loads_the_same_model(loaded: ClipVision, tmp_path: Path) -> None:
    path = tmp_path / "open_clip_visual.safetensors"
    save_clip_vision(path, loaded, open_clip=True)
    with safe_open(str(path), "pt") as opened:
        keys = set(opened.keys())
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in keys and "visual.proj" in keys
    assert not any(key.startswith("vision_model.") for key in keys)
    image = _image(1, 64, 48, seed=9)
    again = encode_image(load_clip_vision(path), image)
    first = encode_image(loaded, image)
    assert all(torch.equal(again[key], first[key]) for key in first)


def _shapes(width: int, layers: int, patch: int, grid: int, inner: int, projection: int) -> dict:
    shapes = {
        "vision_model.embeddings.class_embedding": (width,),
        "vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": (grid * grid + 1, width),
        "visual_projection.weight": (projection, width),
    }
    for index in range(layers):
        shapes[f"vision_model.encoder.layers.{index}.mlp.fc1.weight"] = (inner, width)
    return shapes


def test_configs_of_the_published_models_come_from_their_shapes() -> None:
    vit_l = infer_hf_config(_shapes(1024, 24, 14, 16, 4096, 768))
    assert vit_l == {
        "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 768, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 14,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }  # fmt: skip
    big_g = infer_hf_config(_shapes(1664, 48, 14, 16, 8192, 1280))
    assert (big_g["num_attention_heads"], big_g["hidden_act"], big_g["projection_dim"]) == (16, "gelu", 1280)
    vit_h_open_clip = infer_open_clip_config({
        "conv1.weight": (1280, 3, 14, 14), "positional_embedding": (257, 1280), "proj": (1280, 1024),
        **{f"transformer.resblocks.{i}.mlp.c_fc.weight": (5120, 1280) for i in range(32)},
    })  # fmt: skip
    assert (vit_h_open_clip["num_hidden_layers"], vit_h_open_clip["projection_dim"]) == (32, 1024)
    with pytest.raises(ModelFileError, match="not a square grid"):
        infer_hf_config(_shapes(64, 2, 32, 7, 128, 128) | {
            "vision_model.embeddings.position_embedding.weight": (51, 64)})


def test_files_that_are_not_clip_vision_fail_naming_the_file(models_dir: Path, tmp_path: Path) -> None:
    checkpoint = models_dir / "checkpoints" / "tiny-sd15.safetensors"
    with pytest.raises(ModelFileError, match=r"not a CLIP vision file.*diffusion checkpoint") as caught:
        load_clip_vision(checkpoint)
    assert str(checkpoint) in str(caught.value)
    with pytest.raises(ModelFileError, match="not a CLIP vision file"):
        load_clip_vision(models_dir / "vae" / "tiny-vae.safetensors")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_clip_vision(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_clip_vision(garbage)


def test_a_clip_vision_file_missing_weights_names_them(tiny_file: Path, tmp_path: Path) -> None:
    with safe_open(str(tiny_file), "pt") as opened:
        tensors = {key: opened.get_tensor(key) for key in opened.keys() if "layers.1.mlp" not in key}  # noqa: SIM118
        metadata = opened.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(ModelFileError, match=r"missing 4 required weight\(s\).*layers\.1\.mlp"):
        load_clip_vision(broken)
