"""Whole KSampler runs (``sample_latent``) on micro UNets: every sampler, windows, denoise, inpainting."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffsplit.engine.models.genie_head import tiny_genie_head
from diffsplit.engine.sampling.ksampler import ksampler_sigmas, sample_latent, slice_sigmas, start_noise_scale
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES, get_sampler
from diffsplit.engine.sampling.schedules import DiscreteSchedule, sigmas
from diffsplit.engine.types import DiffusionModel, ModelSampling

MakeCond = Callable[..., list[list[Any]]]
SD = ModelSampling()


def _run(model: DiffusionModel, make_cond: MakeCond, **overrides: Any) -> torch.Tensor:
    arguments: dict[str, Any] = {
        "seed": 42,
        "steps": 3,
        "cfg": 4.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": make_cond(1),
        "negative": make_cond(2),
        "latent": {"samples": torch.zeros(1, 4, 8, 8)},
    }
    arguments.update(overrides)
    return sample_latent(model, **arguments)["samples"]


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_is_deterministic_per_seed(
    sd15: DiffusionModel, make_cond: MakeCond, sampler_name: str, scheduler: str
) -> None:
    if sampler_name == "genie_head":  # the one sampler that needs a MODEL with a head
        sd15 = dataclasses.replace(sd15, genie_head=tiny_genie_head(0))
    first = _run(sd15, make_cond, sampler_name=sampler_name, scheduler=scheduler)
    again = _run(sd15, make_cond, sampler_name=sampler_name, scheduler=scheduler)
    other = _run(sd15, make_cond, sampler_name=sampler_name, scheduler=scheduler, seed=43)
    assert first.shape == (1, 4, 8, 8) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_sdxl_base_and_refiner_sample(
    sdxl: DiffusionModel, refiner: DiffusionModel, make_cond: MakeCond
) -> None:
    base = _run(sdxl, make_cond, sampler_name="dpmpp_2m", steps=2)
    refined = _run(
        refiner, make_cond, sampler_name="dpmpp_2m", steps=2, latent={"samples": base}, denoise=0.5
    )
    assert torch.isfinite(base).all() and torch.isfinite(refined).all()
    assert not torch.equal(base, refined)


def test_partial_denoise_stays_closer_to_the_input(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    full = _run(sd15, make_cond, latent={"samples": image}, steps=4)
    partial = _run(sd15, make_cond, latent={"samples": image}, steps=4, denoise=0.3)
    assert (partial - image).abs().mean() < (full - image).abs().mean() / 2
    unchanged = _run(sd15, make_cond, latent={"samples": image}, denoise=0.0)
    assert torch.equal(unchanged, image)


def test_partial_denoise_schedule_is_the_tail_of_a_longer_one() -> None:
    euler = get_sampler("euler")
    tail = ksampler_sigmas(SD, "karras", euler, 4, denoise=0.5)
    assert torch.equal(tail, sigmas(SD, "karras", 8)[-5:])
    assert len(ksampler_sigmas(SD, "karras", euler, 4, denoise=0.0)) == 0


def test_dpm_2_and_uni_pc_drop_the_penultimate_sigma() -> None:
    longer = sigmas(SD, "normal", 6)
    for name in ("dpm_2", "uni_pc"):
        got = ksampler_sigmas(SD, "normal", get_sampler(name), 5)
        assert torch.equal(got, torch.cat([longer[:-2], longer[-1:]]))


def test_window_slicing_like_comfyui() -> None:
    full = sigmas(SD, "normal", 8)
    first_half = slice_sigmas(full, 0, 4, force_full_denoise=False)
    assert torch.equal(first_half, full[:5])
    finished = slice_sigmas(full, 0, 4, force_full_denoise=True)
    assert finished[-1] == 0 and torch.equal(finished[:-1], full[:4]) and full[4] != 0
    assert torch.equal(slice_sigmas(full, 4, 10000, force_full_denoise=True), full[4:])
    assert len(slice_sigmas(full, 8, 10000, force_full_denoise=True)) == 0


def test_start_noise_is_scaled_like_comfyui() -> None:
    sigma_max = DiscreteSchedule(SD).sigma_max
    assert start_noise_scale(SD, sigma_max) == pytest.approx(math.sqrt(1 + sigma_max**2))
    assert start_noise_scale(SD, 3.0) == 3.0


def test_base_and_refiner_handoff_equals_one_run(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    common = {"steps": 8, "sampler_name": "euler", "scheduler": "karras"}
    one_run = _run(sd15, make_cond, start_step=0, last_step=10000, force_full_denoise=True, **common)
    first = _run(sd15, make_cond, start_step=0, last_step=4, force_full_denoise=False, **common)
    second = _run(
        sd15,
        make_cond,
        latent={"samples": first},
        add_noise=False,
        start_step=4,
        last_step=10000,
        force_full_denoise=True,
        **common,
    )
    assert torch.equal(second, one_run)
    assert not torch.allclose(first, one_run, atol=1e-2)


def test_noise_mask_keeps_the_unmasked_region(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1.0
    latent = {"samples": image, "noise_mask": mask}
    for sampler_name in ("euler", "ddim", "dpmpp_2m"):
        out = sample_latent(
            sd15,
            seed=5,
            steps=3,
            cfg=4.0,
            sampler_name=sampler_name,
            scheduler="normal",
            positive=make_cond(1),
            negative=make_cond(2),
            latent=latent,
        )
        torch.testing.assert_close(out["samples"][..., :4], image[..., :4], rtol=0, atol=1e-5)
        assert not torch.allclose(out["samples"][..., 4:], image[..., 4:], atol=1e-2)
        assert out["noise_mask"] is mask


def test_progress_is_reported_once_per_step(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    calls: list[tuple[int, int]] = []
    _run(
        sd15,
        make_cond,
        sampler_name="heun",
        steps=3,
        progress=lambda step, total: calls.append((step, total)),
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    _run(sd15, make_cond, steps=8, start_step=2, last_step=5, progress=lambda s, t: calls.append((s, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_unknown_names_raise(sd15: DiffusionModel, make_cond: MakeCond) -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        _run(sd15, make_cond, sampler_name="nope")
    with pytest.raises(ValueError, match="unknown scheduler"):
        _run(sd15, make_cond, scheduler="nope")
