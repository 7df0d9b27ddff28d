"""ControlNet hints during sampling: hint images, activity ranges, strength, chains, SDXL, negatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffsplit.engine.sampling.conds import resolve_conditioning
from diffsplit.engine.sampling.control import UNetInputs, control_residuals, hint_is_active, hint_pixels
from diffsplit.engine.sampling.denoiser import CFGDenoiser, can_batch
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import ControlHint, ControlNet, DiffusionModel, ModelSampling

MakeCond = Callable[..., list[list[Any]]]
SCHEDULE = DiscreteSchedule(ModelSampling())
SHAPE = (1, 4, 8, 8)
#: batch-of-1 versus batch-of-2 UNet passes differ in the last bits (times cfg 5)
CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def _image(seed: int, height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 3.0


def _with_hint(conditioning: list[list[Any]], hint: ControlHint) -> list[list[Any]]:
    return [[cond, {**extras, "control": hint}] for cond, extras in conditioning]


def _denoise(model: DiffusionModel, positive: Any, negative: Any, sigma: float = 3.0) -> torch.Tensor:
    x = _x()
    return CFGDenoiser.build(model, positive, negative, 5.0, x.shape)(x, torch.tensor(sigma))


def test_hint_pixels_center_crop_and_resize() -> None:
    wide = torch.zeros(1, 32, 64, 3)
    wide[:, :, 16:48, :] = 1.0
    pixels = hint_pixels(wide, 4, 4, batch=3)
    # 64x32 cut to its centred 32x32 (all ones), then nearest-exact to 32x32.
    assert pixels.shape == (3, 3, 32, 32)
    assert torch.equal(pixels, torch.ones_like(pixels))
    small = hint_pixels(_image(1, 16, 16), 8, 8, batch=1)
    assert small.shape == (1, 3, 64, 64)
    assert torch.equal(small[0, :, ::4, ::4], _image(1, 16, 16)[0].movedim(-1, 0))


def test_hint_activity_follows_percent_range() -> None:
    hint = ControlHint(controlnet=None, image=_image(0), strength=1.0, start_percent=0.5, end_percent=1.0)  # type: ignore[arg-type]
    boundary = SCHEDULE.percent_to_sigma(0.5)
    assert not hint_is_active(hint, SCHEDULE, boundary * 1.01)
    assert hint_is_active(hint, SCHEDULE, boundary * 0.99)
    assert hint_is_active(hint, SCHEDULE, 0.0)
    whole = ControlHint(controlnet=None, image=_image(0), strength=1.0)  # type: ignore[arg-type]
    assert hint_is_active(whole, SCHEDULE, SCHEDULE.sigma_max) and hint_is_active(whole, SCHEDULE, 0.0)


def test_strength_zero_is_no_control_and_one_is_not(
    sd15: DiffusionModel, controlnet: ControlNet, make_cond: MakeCond
) -> None:
    positive, negative = make_cond(1), make_cond(2)
    plain = _denoise(sd15, positive, negative)
    off = ControlHint(controlnet=controlnet, image=_image(3), strength=0.0)
    on = ControlHint(controlnet=controlnet, image=_image(3), strength=1.0)
    torch.testing.assert_close(_denoise(sd15, _with_hint(positive, off), negative), plain, **CLOSE)
    assert not torch.allclose(_denoise(sd15, _with_hint(positive, on), negative), plain, atol=1e-3)


def test_hint_outside_its_range_is_no_control(
    sd15: DiffusionModel, controlnet: ControlNet, make_cond: MakeCond
) -> None:
    positive, negative = make_cond(1), make_cond(2)
    late = ControlHint(
        controlnet=controlnet, image=_image(3), strength=1.0, start_percent=0.9, end_percent=1.0
    )
    # Equal up to float differences: a hinted positive cannot share a batch with the plain negative.
    torch.testing.assert_close(
        _denoise(sd15, _with_hint(positive, late), negative), _denoise(sd15, positive, negative), **CLOSE
    )
    assert not torch.allclose(
        _denoise(sd15, _with_hint(positive, late), negative, sigma=0.05),
        _denoise(sd15, positive, negative, sigma=0.05),
        atol=1e-4,
    )


def test_chained_hints_add_their_residuals(sd15: DiffusionModel, controlnet: ControlNet) -> None:
    first = ControlHint(controlnet=controlnet, image=_image(4), strength=0.7)
    second = ControlHint(controlnet=controlnet, image=_image(5), strength=1.3, previous=first)
    second_alone = ControlHint(controlnet=controlnet, image=_image(5), strength=1.3)
    inputs = UNetInputs(
        x_in=_x(1) / 10**0.5,
        timestep=torch.tensor([400.0]),
        context=torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(8)),
        added=None,
    )
    with torch.no_grad():
        chained = control_residuals(second, SCHEDULE, 3.0, inputs)
        parts = [control_residuals(h, SCHEDULE, 3.0, inputs) for h in (first, second_alone)]
    assert chained is not None and parts[0] is not None and parts[1] is not None
    torch.testing.assert_close(chained.mid, parts[0].mid + parts[1].mid)
    for got, a, b in zip(chained.down, parts[0].down, parts[1].down, strict=True):
        torch.testing.assert_close(got, a + b)
    inactive_top = ControlHint(
        controlnet=controlnet,
        image=_image(5),
        strength=1.3,
        start_percent=0.99,
        end_percent=1.0,
        previous=first,
    )
    with torch.no_grad():
        passed_on = control_residuals(inactive_top, SCHEDULE, 3.0, inputs)
    assert passed_on is not None and torch.equal(passed_on.mid, parts[0].mid)


def test_sdxl_controlnet_gets_the_added_conds(sdxl: DiffusionModel, make_cond: MakeCond) -> None:
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        model = ControlNetModel.from_unet(sdxl.unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
    hint = ControlHint(controlnet=ControlNet(model=model), image=_image(6), strength=1.0)
    positive, negative = make_cond(1), make_cond(2)
    assert torch.isfinite(_denoise(sdxl, _with_hint(positive, hint), negative)).all()


def test_apply_to_uncond_copies_the_hint_to_the_negative(
    sd15: DiffusionModel, controlnet: ControlNet, make_cond: MakeCond
) -> None:
    hint = ControlHint(controlnet=controlnet, image=_image(7), strength=1.0)
    positive = [[make_cond(1)[0][0], {"control": hint, "control_apply_to_uncond": True}]]
    resolved = resolve_conditioning(sd15, SCHEDULE, positive, make_cond(2), SHAPE)
    assert [c.control for c in resolved] == [hint, hint]
    # A hint shared by positive and negative lets both run in one batch.
    assert can_batch(resolved[0], resolved[1], 8, 8)
    advanced = [[make_cond(1)[0][0], {"control": hint, "control_apply_to_uncond": False}]]
    resolved = resolve_conditioning(sd15, SCHEDULE, advanced, make_cond(2), SHAPE)
    assert resolved[1].control is None and not can_batch(resolved[0], resolved[1], 8, 8)


@pytest.mark.parametrize("cfg", [1.0, 6.0])
def test_controlled_sampling_is_deterministic(
    sd15: DiffusionModel, controlnet: ControlNet, make_cond: MakeCond, cfg: float
) -> None:
    hint = ControlHint(controlnet=controlnet, image=_image(9, 48, 80), strength=0.8)
    positive = _with_hint(make_cond(1), hint)
    x = _x(2)
    first = CFGDenoiser.build(sd15, positive, make_cond(2), cfg, x.shape)(x, torch.tensor(1.0))
    again = CFGDenoiser.build(sd15, positive, make_cond(2), cfg, x.shape)(x, torch.tensor(1.0))
    assert torch.equal(first, again)


def test_adapter_features_are_computed_once_per_run_and_never_shared_between_runs() -> None:
    from diffsplit.engine.models.t2i_adapter import tiny_t2i_adapter
    from diffsplit.engine.sampling.control import AdapterFeatures

    adapter = tiny_t2i_adapter((32, 32, 32, 32), seed=3)
    forwards = [0]
    adapter.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    hint = ControlHint(controlnet=ControlNet(adapter), image=_image(2), strength=0.5)

    def inputs(cache: AdapterFeatures | None) -> UNetInputs:
        return UNetInputs(x_in=torch.zeros(2, 4, 8, 8), timestep=torch.zeros(2), context=torch.zeros(2, 1, 8),
                          added=None, adapter_features=cache)

    run = AdapterFeatures()
    first = control_residuals(hint, SCHEDULE, 3.0, inputs(run))
    again = control_residuals(hint, SCHEDULE, 1.0, inputs(run))
    assert forwards[0] == 1 and first is not None and again is not None
    assert all(a is b for a, b in zip(first.intrablock, again.intrablock, strict=True))
    # a new run (or a hint rebuilt at another strength) computes its own
    other = control_residuals(hint, SCHEDULE, 3.0, inputs(AdapterFeatures()))
    assert forwards[0] == 2 and other is not None
    assert all(torch.equal(a, b) for a, b in zip(first.intrablock, other.intrablock, strict=True))
    stronger = ControlHint(controlnet=ControlNet(adapter), image=hint.image, strength=1.0)
    doubled = control_residuals(stronger, SCHEDULE, 3.0, inputs(run))
    assert forwards[0] == 3 and doubled is not None
    assert all(torch.allclose(a * 2, b) for a, b in zip(first.intrablock, doubled.intrablock, strict=True))
    # no cache: computed at every call
    control_residuals(hint, SCHEDULE, 3.0, inputs(None))
    control_residuals(hint, SCHEDULE, 3.0, inputs(None))
    assert forwards[0] == 5
