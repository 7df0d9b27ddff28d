"""The CFG denoiser on micro diffusers UNets: guidance, batching, areas, SDXL, v-prediction, inpainting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffsplit.engine.sampling.conds import resolve_conditioning
from diffsplit.engine.sampling.denoiser import CFGDenoiser, InpaintDenoiser, prepare_denoise_mask
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import DiffusionModel, ModelSampling

SHAPE = (1, 4, 8, 8)
SIGMA = torch.tensor(3.0)

MakeCond = Callable[..., list[list[Any]]]


def _x(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3.0


def _denoise(
    model: DiffusionModel, positive: Any, negative: Any, cfg: float, x: torch.Tensor
) -> torch.Tensor:
    return CFGDenoiser.build(model, positive, negative, cfg, x.shape)(x, SIGMA)


@torch.no_grad()
def _by_hand(
    model: DiffusionModel, context: torch.Tensor, x: torch.Tensor, sigma: float = 3.0
) -> torch.Tensor:
    """The eps-model denoised latent computed directly from the UNet."""
    timestep = DiscreteSchedule(model.sampling).timestep(torch.tensor(sigma))
    scaled = x / (sigma**2 + 1) ** 0.5
    eps = model.unet(scaled, timestep.expand(x.shape[0]), encoder_hidden_states=context).sample
    return x - eps * sigma


def test_cfg_one_is_the_positive_prediction_alone(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x()
    positive, negative = make_cond(1), make_cond(2)
    expected = _by_hand(sd15, positive[0][0], x)
    torch.testing.assert_close(_denoise(sd15, positive, negative, 1.0, x), expected, rtol=1e-5, atol=1e-5)
    # The negative prompt is not even run when cfg is 1.
    other_negative = make_cond(3)
    assert torch.equal(
        _denoise(sd15, positive, negative, 1.0, x), _denoise(sd15, positive, other_negative, 1.0, x)
    )


def test_cfg_combines_batched_cond_and_uncond(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(1)
    positive, negative = make_cond(1), make_cond(2)
    cond = _by_hand(sd15, positive[0][0], x)
    uncond = _by_hand(sd15, negative[0][0], x)
    guided = _denoise(sd15, positive, negative, 7.5, x)
    torch.testing.assert_close(guided, uncond + (cond - uncond) * 7.5, rtol=1e-4, atol=1e-4)


def test_long_prompt_against_short_negative_is_padded_by_repetition(
    sd15: DiffusionModel, make_cond: MakeCond
) -> None:
    x = _x(2)
    long_positive = make_cond(1, tokens=154)
    short_negative = make_cond(2, tokens=77)
    repeated_negative = [[short_negative[0][0].repeat(1, 2, 1), short_negative[0][1]]]
    mixed = _denoise(sd15, long_positive, short_negative, 5.0, x)
    torch.testing.assert_close(
        mixed, _denoise(sd15, long_positive, repeated_negative, 5.0, x), rtol=1e-4, atol=1e-4
    )


def test_incompatible_lengths_run_apart_with_the_same_result(
    sd15: DiffusionModel, make_cond: MakeCond
) -> None:
    x = _x(3)
    positive, negative = make_cond(1, tokens=77 * 5), make_cond(2, tokens=77)
    cond = _by_hand(sd15, positive[0][0], x)
    uncond = _by_hand(sd15, negative[0][0], x)
    torch.testing.assert_close(
        _denoise(sd15, positive, negative, 3.0, x), uncond + (cond - uncond) * 3.0, rtol=1e-4, atol=1e-4
    )


def test_two_full_entries_are_averaged(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(4)
    first, second = make_cond(1), make_cond(5)
    both = _denoise(sd15, first + second, make_cond(2), 1.0, x)
    expected = (_by_hand(sd15, first[0][0], x) + _by_hand(sd15, second[0][0], x)) / 2
    torch.testing.assert_close(both, expected, rtol=1e-4, atol=1e-4)


def test_area_entry_only_changes_its_region(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(5, (1, 4, 16, 32))
    base = make_cond(1)
    right_half = make_cond(6, area=(16, 16, 0, 16), strength=1.0)
    plain = _denoise(sd15, base, make_cond(2), 1.0, x)
    with_area = _denoise(sd15, base + right_half, make_cond(2), 1.0, x)
    torch.testing.assert_close(with_area[..., :16], plain[..., :16])
    assert not torch.allclose(with_area[..., 16:], plain[..., 16:], atol=1e-3)


def test_area_entries_get_an_opposite_with_the_same_area(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    negative = make_cond(2)
    positive = make_cond(1) + make_cond(6, area=(16, 16, 8, 8), strength=0.5)
    resolved = resolve_conditioning(sd15, DiscreteSchedule(sd15.sampling), positive, negative, (1, 4, 32, 32))
    added = [c for c in resolved if c.is_uncond and c.area is not None]
    assert len(resolved) == 4 and len(added) == 1
    assert added[0].area == (16, 16, 8, 8)
    assert torch.equal(added[0].context, negative[0][0])
    # Weights: strength times ComfyUI's 8-pixel feather at edges inside the latent.
    weight = added[0].weight
    assert weight.shape == (1, 4, 16, 16)
    assert float(weight[0, 0, 0, 0]) == pytest.approx(0.5 * (1 / 8) * (1 / 8))
    assert float(weight[0, 0, 7, 8]) == pytest.approx(0.5) and float(weight[0, 0, 8, 15]) == pytest.approx(
        0.5 / 8
    )


def test_timestep_range_switches_an_entry_off(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(6)
    late_only = make_cond(5, start_percent=0.5, end_percent=1.0)
    base = make_cond(1)
    # At sigma 3 (early, about 30% through) the late entry is inactive: only the base predicts.
    torch.testing.assert_close(
        _denoise(sd15, base + late_only, make_cond(2), 1.0, x), _denoise(sd15, base, make_cond(2), 1.0, x)
    )
    late = CFGDenoiser.build(sd15, base + late_only, make_cond(2), 1.0, x.shape)(x, torch.tensor(0.5))
    assert not torch.allclose(
        late, CFGDenoiser.build(sd15, base, make_cond(2), 1.0, x.shape)(x, torch.tensor(0.5))
    )


def test_v_prediction_denoised_formula(make_cond: MakeCond, sd15: DiffusionModel) -> None:
    v_model = DiffusionModel(
        unet=sd15.unet, family="sd15", sampling=ModelSampling(prediction_type="v_prediction")
    )
    x = _x(7)
    positive = make_cond(1)
    with torch.no_grad():
        timestep = DiscreteSchedule(v_model.sampling).timestep(SIGMA)
        v = sd15.unet(
            x / (3.0**2 + 1) ** 0.5, timestep.expand(1), encoder_hidden_states=positive[0][0]
        ).sample
    expected = x / 10.0 - v * 3.0 / 10.0**0.5
    torch.testing.assert_close(
        _denoise(v_model, positive, make_cond(2), 1.0, x), expected, rtol=1e-5, atol=1e-5
    )


def test_sdxl_time_ids_follow_comfyui_defaults(
    sdxl: DiffusionModel, refiner: DiffusionModel, make_cond: MakeCond
) -> None:
    schedule = DiscreteSchedule(sdxl.sampling)
    shape = (2, 4, 8, 12)
    base = resolve_conditioning(sdxl, schedule, make_cond(1, width=1024, crop_h=16), make_cond(2), shape)
    assert base[0].added["time_ids"].tolist() == [[64.0, 1024.0, 16.0, 0.0, 64.0, 1024.0]] * 2
    assert base[1].added["time_ids"][0].tolist() == [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]
    assert base[0].added["text_embeds"].shape == (2, 8) and base[0].context.shape[0] == 2
    refined = resolve_conditioning(refiner, schedule, make_cond(1), make_cond(2), shape)
    assert refined[0].added["time_ids"][0].tolist() == [64.0, 96.0, 0.0, 0.0, 6.0]
    assert refined[1].added["time_ids"][0].tolist() == [64.0, 96.0, 0.0, 0.0, 2.5]


def test_sdxl_size_conditioning_reaches_the_unet(sdxl: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(8)
    small = _denoise(sdxl, make_cond(1, width=512, height=512), make_cond(2), 4.0, x)
    large = _denoise(sdxl, make_cond(1, width=2048, height=2048), make_cond(2), 4.0, x)
    assert torch.isfinite(small).all() and not torch.allclose(small, large)


def test_inpaint_denoiser_holds_the_unmasked_region() -> None:
    latent = _x(9)
    noise = _x(10) / 3.0
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1.0
    denoise_mask = prepare_denoise_mask(mask, latent.shape)
    seen = []

    def inner(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return torch.full_like(x, 5.0)

    out = InpaintDenoiser(inner, latent, noise, denoise_mask)(torch.zeros_like(latent), torch.tensor(2.0))
    assert denoise_mask.shape == latent.shape
    torch.testing.assert_close(seen[0][..., :4], latent[..., :4] + noise[..., :4] * 2.0)
    assert torch.equal(seen[0][..., 4:], torch.zeros_like(latent[..., 4:]))
    assert torch.equal(out[..., :4], latent[..., :4]) and torch.equal(
        out[..., 4:], torch.full_like(out[..., 4:], 5.0)
    )


def test_percentage_area_and_mask_bounds_resolve_to_latent_pixels(
    sd15: DiffusionModel, make_cond: MakeCond
) -> None:
    schedule = DiscreteSchedule(sd15.sampling)
    mask = torch.zeros(1, 128, 256)
    mask[:, 32:96, 128:192] = 1.0
    positive = make_cond(1, area=("percentage", 0.5, 0.25, 0.5, 0.75)) + make_cond(
        3, mask=mask, mask_strength=0.5, set_area_to_bounds=True
    )
    resolved = resolve_conditioning(sd15, schedule, positive, make_cond(2), (1, 4, 16, 32))
    assert resolved[0].area == (8, 8, 8, 24)
    # The 128x256 mask is scaled to the 16x32 latent; its box is 8x8 at (4, 16).
    assert resolved[1].area == (8, 8, 4, 16)
    assert resolved[1].weight.shape == (1, 4, 8, 8) and float(resolved[1].weight.max()) == pytest.approx(0.5)


def test_mask_entry_only_acts_where_the_mask_is_set(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    x = _x(11, (1, 4, 8, 16))
    mask = torch.zeros(8, 16)
    mask[:, :8] = 1.0
    base = make_cond(1)
    plain = _denoise(sd15, base, make_cond(2), 1.0, x)
    masked = _denoise(sd15, base + make_cond(4, mask=mask), make_cond(2), 1.0, x)
    torch.testing.assert_close(masked[..., 8:], plain[..., 8:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(masked[..., :8], plain[..., :8], atol=1e-3)
