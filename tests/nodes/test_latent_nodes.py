"""EmptyLatentImage, latent upscaling, VAE decode/encode and noise masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_vae
from diffsplit.engine.nodes.latent import (
    EMPTY_LATENT_IMAGE,
    LATENT_UPSCALE,
    LATENT_UPSCALE_BY,
    SET_LATENT_NOISE_MASK,
    VAE_DECODE,
    VAE_ENCODE,
    VAE_ENCODE_FOR_INPAINT,
    grow_mask,
)
from diffsplit.engine.types import Vae


@pytest.fixture(scope="module")
def vae(models_dir: Path) -> Vae:
    return load_vae(models_dir / "vae" / "tiny-vae.safetensors")


def _latent(seed: int, height: int = 6, width: int = 8) -> dict:
    samples = torch.randn((2, 4, height, width), generator=torch.Generator().manual_seed(seed))
    return {"samples": samples, "batch_index": [3, 4]}


def _pixels(seed: int, height: int, width: int) -> torch.Tensor:
    return torch.rand((1, height, width, 3), generator=torch.Generator().manual_seed(seed))


def test_empty_latent_image_shape() -> None:
    (latent,) = EMPTY_LATENT_IMAGE.function(None, width=512, height=320, batch_size=3)
    assert latent["samples"].shape == (3, 4, 40, 64)
    assert latent["samples"].dtype == torch.float32 and torch.count_nonzero(latent["samples"]) == 0


def test_latent_upscale_to_size_keeps_other_keys_and_input() -> None:
    latent = _latent(0)
    original = latent["samples"].clone()
    (scaled,) = LATENT_UPSCALE.function(
        None, samples=latent, upscale_method="bilinear", width=128, height=96, crop="disabled"
    )
    assert scaled["samples"].shape == (2, 4, 12, 16)
    assert scaled["batch_index"] == [3, 4]
    assert torch.equal(latent["samples"], original) and latent["samples"].shape == (2, 4, 6, 8)


def test_latent_upscale_zero_side_keeps_aspect_and_minimum() -> None:
    latent = _latent(1)
    (by_width,) = LATENT_UPSCALE.function(
        None, samples=latent, upscale_method="nearest-exact", width=128, height=0, crop="disabled"
    )
    assert by_width["samples"].shape[-2:] == (12, 16)
    (tiny,) = LATENT_UPSCALE.function(
        None, samples=latent, upscale_method="area", width=16, height=16, crop="center"
    )
    assert tiny["samples"].shape[-2:] == (8, 8)  # at least 64 pixels a side


def test_latent_upscale_by_rounds() -> None:
    (scaled,) = LATENT_UPSCALE_BY.function(None, samples=_latent(2), upscale_method="bicubic", scale_by=1.5)
    assert scaled["samples"].shape == (2, 4, 9, 12)


def test_bislerp_keeps_unit_vectors_unit_length() -> None:
    samples = torch.nn.functional.normalize(_latent(3)["samples"], dim=1)
    (slerped,) = LATENT_UPSCALE_BY.function(
        None, samples={"samples": samples}, upscale_method="bislerp", scale_by=2.0
    )
    (linear,) = LATENT_UPSCALE_BY.function(
        None, samples={"samples": samples}, upscale_method="bilinear", scale_by=2.0
    )
    assert slerped["samples"].shape == (2, 4, 12, 16)
    slerp_norms = slerped["samples"].norm(dim=1)
    torch.testing.assert_close(slerp_norms, torch.ones_like(slerp_norms), atol=1e-4, rtol=0)
    assert linear["samples"].norm(dim=1).min() < 0.95  # plain interpolation shrinks them
    # samples that fall exactly on a source cell keep that cell's vector
    torch.testing.assert_close(slerped["samples"][..., 0, 0], samples[..., 0, 0])


def test_vae_decode_gives_channels_last_images_in_range(vae: Vae) -> None:
    latent = _latent(4, 4, 5)
    original = latent["samples"].clone()
    (image,) = VAE_DECODE.function(None, samples=latent, vae=vae)
    assert image.shape == (2, 32, 40, 3) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert torch.equal(latent["samples"], original)
    with torch.no_grad():
        direct = vae.model.decode(original / vae.scaling_factor).sample
    torch.testing.assert_close(image, ((direct + 1) / 2).clamp(0, 1).movedim(1, -1))


def test_vae_encode_crops_to_multiples_of_8_and_scales_the_mean(vae: Vae) -> None:
    pixels = _pixels(5, 70, 75)
    (latent,) = VAE_ENCODE.function(None, pixels=pixels, vae=vae)
    assert latent["samples"].shape == (1, 4, 8, 9)
    centre = pixels[:, 3:67, 1:73, :]  # 70 % 8 = 6 → 3 off the top; 75 % 8 = 3 → 1 off the left
    with torch.no_grad():
        mean = vae.model.encode(centre.movedim(-1, 1) * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latent["samples"], mean * vae.scaling_factor)
    (again,) = VAE_ENCODE.function(None, pixels=pixels, vae=vae)
    assert torch.equal(again["samples"], latent["samples"])  # no sampling


def test_vae_round_trip_shapes(vae: Vae) -> None:
    pixels = _pixels(6, 48, 64)
    (latent,) = VAE_ENCODE.function(None, pixels=pixels, vae=vae)
    (decoded,) = VAE_DECODE.function(None, samples=latent, vae=vae)
    assert latent["samples"].shape == (1, 4, 6, 8)
    assert decoded.shape == pixels.shape


def test_grow_mask_dilates_by_a_box() -> None:
    mask = torch.zeros((1, 1, 20, 20))
    mask[0, 0, 10, 10] = 1.0
    grown = grow_mask(mask, 6)
    assert grown.shape == mask.shape
    rows, cols = torch.nonzero(grown[0, 0], as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (8, 13, 8, 13)
    assert torch.equal(grow_mask(mask, 0), mask)


def test_vae_encode_for_inpaint_grays_masked_pixels_and_grows_mask(vae: Vae) -> None:
    pixels = _pixels(7, 32, 32)
    original = pixels.clone()
    mask = torch.zeros((1, 32, 32))
    mask[:, 8:16, 8:16] = 1.0
    (latent,) = VAE_ENCODE_FOR_INPAINT.function(None, pixels=pixels, vae=vae, mask=mask, grow_mask_by=6)
    noise_mask = latent["noise_mask"]
    assert noise_mask.shape == (1, 1, 32, 32)
    assert noise_mask.sum() > mask.sum()  # grown
    assert torch.all(noise_mask[0, 0, 8:16, 8:16] == 1.0) and noise_mask[0, 0, 0, 0] == 0.0
    grayed = original.clone()
    grayed[:, 8:16, 8:16, :] = 0.5
    (expected,) = VAE_ENCODE.function(None, pixels=grayed, vae=vae)
    torch.testing.assert_close(latent["samples"], expected["samples"])
    assert torch.equal(pixels, original)


def test_set_latent_noise_mask_reshapes_and_copies() -> None:
    latent = _latent(8)
    (masked,) = SET_LATENT_NOISE_MASK.function(None, samples=latent, mask=torch.ones((2, 48, 64)))
    assert masked["noise_mask"].shape == (2, 1, 48, 64)
    assert masked["samples"] is latent["samples"]
    assert "noise_mask" not in latent


def test_declarations() -> None:
    assert [spec.name for spec in EMPTY_LATENT_IMAGE.widget_inputs] == ["width", "height", "batch_size"]
    assert EMPTY_LATENT_IMAGE.input("width").min == 16 and EMPTY_LATENT_IMAGE.input("width").step == 8
    methods = LATENT_UPSCALE.input("upscale_method").choices
    assert methods == ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
    assert [spec.name for spec in LATENT_UPSCALE.widget_inputs] == [
        "upscale_method",
        "width",
        "height",
        "crop",
    ]
    assert VAE_ENCODE_FOR_INPAINT.input("grow_mask_by").default == 6
