"""Samplers on an analytic toy problem, and the noise streams they draw from.

The toy data is Gaussian, N(MEAN, STD^2) per element, so the exact denoiser is
``E[x0 | x] = MEAN + STD^2 / (STD^2 + sigma^2) * (x - MEAN)`` and the
probability-flow ODE maps a start ``x_T`` at sigma_T to
``MEAN + STD / sqrt(STD^2 + sigma_T^2) * (x_T - MEAN)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.models.genie_head import tiny_genie_head
from diffsplit.engine.sampling.noise import (
    BrownianTreeNoiseSampler,
    GaussianNoiseSampler,
    prepare_noise,
    seeded_generator,
)
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES, get_sampler
from diffsplit.engine.sampling.schedules import sigmas
from diffsplit.engine.types import ModelSampling
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

MEAN, STD = 0.7, 0.5
SD = ModelSampling()
ODE_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2")
HIGHER_ORDER = ("heun", "dpm_2", "lms", "dpmpp_2m", "uni_pc", "uni_pc_bh2")
SDE_SAMPLERS = (
    "euler_ancestral",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
)


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


def _schedule(steps: int) -> torch.Tensor:
    return sigmas(SD, "karras", steps)


def _start(sigma_max: torch.Tensor, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed)) * sigma_max


def _ode_error(name: str, steps: int) -> float:
    schedule = _schedule(steps)
    x_t = _start(schedule[0])
    sample = get_sampler(name).function(exact_denoiser, x_t, schedule)
    exact = MEAN + STD / (STD**2 + schedule[0] ** 2) ** 0.5 * (x_t - MEAN)
    return float((sample - exact).abs().max())


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_converge_to_the_exact_flow(name: str) -> None:
    coarse, fine = _ode_error(name, 10), _ode_error(name, 30)
    assert fine < coarse
    assert fine < (0.02 if name in HIGHER_ORDER else 0.15)


def test_higher_order_samplers_beat_euler() -> None:
    euler = _ode_error("euler", 20)
    for name in HIGHER_ORDER:
        assert _ode_error(name, 20) < euler / 3, name


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_stochastic_samplers_reach_the_data_distribution(name: str) -> None:
    schedule = _schedule(200)
    sample = get_sampler(name).function(
        exact_denoiser, _start(schedule[0], size=64), schedule, generator=seeded_generator(3)
    )
    assert float(sample.mean()) == pytest.approx(MEAN, abs=0.02)
    assert float(sample.std()) == pytest.approx(STD, abs=0.03)


def test_lcm_jumps_to_the_denoised_latent_and_renoises() -> None:
    schedule = torch.tensor([5.0, 2.0, 0.0])
    x_t = _start(schedule[0], size=8)
    seen = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return exact_denoiser(x, sigma)

    sample = get_sampler("lcm").function(denoiser, x_t, schedule, generator=seeded_generator(4))
    first_noise = GaussianNoiseSampler(x_t, seeded_generator(4))(schedule[0], schedule[1])
    torch.testing.assert_close(seen[1], exact_denoiser(x_t, schedule[0]) + first_noise * 2.0)
    torch.testing.assert_close(sample, exact_denoiser(seen[1], schedule[1]))


@dataclass(frozen=True)
class _WithHead:
    """The exact denoiser behind a MODEL-like object carrying a GENIE head (the genie_head sampler's)."""

    model: Any

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return exact_denoiser(x, sigma)


def _denoiser_for(name: str) -> Any:
    """``exact_denoiser``; for genie_head, the same with a seeded head attached."""
    if name == "genie_head":
        return _WithHead(SimpleNamespace(genie_head=tiny_genie_head(0)))
    return exact_denoiser


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_is_deterministic_for_a_generator_seed(name: str) -> None:
    schedule = sigmas(SD, "normal", 6)
    x_t = _start(schedule[0], size=8)
    run = get_sampler(name).function
    denoiser = _denoiser_for(name)
    first = run(denoiser, x_t, schedule, generator=seeded_generator(11))
    again = run(denoiser, x_t, schedule, generator=seeded_generator(11))
    other_seed = run(denoiser, x_t, schedule, generator=seeded_generator(12))
    assert torch.equal(first, again)
    assert torch.isfinite(first).all()
    if name in SDE_SAMPLERS or name == "lcm":
        assert not torch.allclose(first, other_seed)
    else:
        assert torch.equal(first, other_seed)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_callback_runs_once_per_step_in_order(name: str) -> None:
    schedule = sigmas(SD, "karras", 5)
    steps: list[int] = []
    get_sampler(name).function(
        _denoiser_for(name),
        _start(schedule[0], size=8),
        schedule,
        generator=seeded_generator(0),
        callback=lambda step, x, denoised: steps.append(step),
    )
    assert steps == list(range(5))


def test_sampler_registry() -> None:
    required = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc", "lcm")
    assert set(required) <= set(SAMPLER_NAMES)
    assert get_sampler("dpm_2").discards_penultimate_sigma
    assert get_sampler("uni_pc").discards_penultimate_sigma
    assert not get_sampler("euler").discards_penultimate_sigma
    assert get_sampler("ddim").random_inpaint_noise
    assert get_sampler("ddim").function is get_sampler("euler").function
    with pytest.raises(ValueError, match="unknown sampler 'lmz'"):
        get_sampler("lmz")
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):  # noise is drawn on the CPU either way
        assert get_sampler(f"{name}_gpu").function is get_sampler(name).function


def test_prepare_noise_is_comfyui_start_noise() -> None:
    latent = torch.zeros(2, 4, 8, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        comfy = torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    assert torch.equal(prepare_noise(latent, 1234), comfy)
    assert not torch.equal(prepare_noise(latent, 1235), comfy)
    assert torch.equal(prepare_noise(latent, 2**64 - 1), prepare_noise(latent, 2**64 - 1))


def test_batch_index_gives_each_latent_its_own_noise() -> None:
    batch_of_two = prepare_noise(torch.zeros(2, 4, 8, 8), 7)
    second_alone = prepare_noise(torch.zeros(1, 4, 8, 8), 7, batch_index=[1])
    assert torch.equal(second_alone, batch_of_two[1:2])
    swapped = prepare_noise(torch.zeros(2, 4, 8, 8), 7, batch_index=[1, 0])
    assert torch.equal(swapped, batch_of_two.flip(0))


def test_brownian_tree_is_torchsdes_tree_seeded_as_comfyui_seeds_it() -> None:
    import torchsde

    like = torch.zeros(1, 4, 16, 16)
    sigmas = torch.tensor([14.6, 8.0, 2.0, 0.5, 0.0])
    noise = BrownianTreeNoiseSampler.for_run(like, sigmas, seeded_generator(5))
    # ComfyUI: BrownianTree(sigma_min, zeros_like(x), sigma_max, entropy=seed); query sorted, sign flipped
    tree = torchsde.BrownianTree(torch.tensor(0.5), torch.zeros(1, 4, 16, 16), torch.tensor(14.6), entropy=5)
    expected = -tree(torch.tensor(2.0), torch.tensor(8.0)) / torch.tensor(6.0).sqrt()
    torch.testing.assert_close(noise(torch.tensor(8.0), torch.tensor(2.0)), expected, rtol=0, atol=0)


def test_brownian_increments_add_up_over_adjacent_intervals() -> None:
    like = torch.zeros(1, 4, 16, 16)
    sigmas = torch.tensor([10.0, 0.1, 0.0])
    noise = BrownianTreeNoiseSampler.for_run(like, sigmas, seeded_generator(5))
    long = noise(torch.tensor(8.0), torch.tensor(2.0)) * 6**0.5
    first = noise(torch.tensor(8.0), torch.tensor(5.0)) * 3**0.5
    second = noise(torch.tensor(5.0), torch.tensor(2.0)) * 3**0.5
    torch.testing.assert_close(first + second, long, rtol=1e-4, atol=1e-4)
    assert float(long.std() / 6**0.5) == pytest.approx(1.0, abs=0.1)
    repeat = BrownianTreeNoiseSampler.for_run(like, sigmas, seeded_generator(5))
    assert torch.equal(repeat(torch.tensor(8.0), torch.tensor(2.0)) * 6**0.5, long)
    other = BrownianTreeNoiseSampler.for_run(like, sigmas, seeded_generator(6))
    assert not torch.equal(other(torch.tensor(8.0), torch.tensor(2.0)) * 6**0.5, long)


def test_brownian_draws_have_unit_variance() -> None:
    like = torch.zeros(1, 4, 64, 64)
    noise = BrownianTreeNoiseSampler.for_run(like, torch.tensor([10.0, 0.5, 0.0]), seeded_generator(6))
    inner = noise(torch.tensor(4.0), torch.tensor(3.0))
    assert float(inner.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(inner.std()) == pytest.approx(1.0, abs=0.05)


def _diffusers_run(scheduler: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A diffusers multistep scheduler on the toy problem: (sigmas, start, result), in sigma space."""
    scheduler.set_timesteps(steps)
    schedule = scheduler.sigmas
    x_t = _start(schedule[0], size=8, seed=0)
    sample = x_t / (1 + schedule[0] ** 2) ** 0.5
    for index, timestep in enumerate(scheduler.timesteps):
        sigma = schedule[index]
        x = sample * (1 + sigma**2) ** 0.5
        eps = (x - exact_denoiser(x, sigma)) / sigma
        sample = scheduler.step(eps, timestep, sample).prev_sample
    return schedule, x_t, sample * (1 + schedule[-1] ** 2) ** 0.5


_DIFFUSERS_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize(("name", "variant"), [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("steps", [5, 12])
def test_unipc_matches_diffusers_unipc_scheduler(name: str, variant: str, steps: int) -> None:
    scheduler = UniPCMultistepScheduler(
        **_DIFFUSERS_SCHEDULE, solver_order=3, solver_type=variant, predict_x0=True,
        lower_order_final=True, final_sigmas_type="sigma_min",
    )  # fmt: skip
    schedule, x_t, expected = _diffusers_run(scheduler, steps)
    sample = get_sampler(name).function(exact_denoiser, x_t, schedule.clone())
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-5)


def test_dpmpp_2m_matches_diffusers_dpm_solver_plus_plus() -> None:
    scheduler = DPMSolverMultistepScheduler(
        **_DIFFUSERS_SCHEDULE, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="sigma_min",
    )  # fmt: skip
    schedule, x_t, expected = _diffusers_run(scheduler, 20)
    sample = get_sampler("dpmpp_2m").function(exact_denoiser, x_t, schedule.clone())
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-5)
