"""GENIE: the 2D mixture against its exact ODE, the JVP against finite differences, and real UNets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffsplit.engine.sampling.denoiser import CFGDenoiser
from diffsplit.engine.sampling.genie import Curvature, genie_step, run_genie
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.sampling.mixture import GaussianMixture, ddim_reference
from diffsplit.engine.sampling.schedules import DiscreteSchedule
from diffsplit.engine.types import DiffusionModel, ModelSampling

MIXTURE = GaussianMixture.default()


def _points(sigma: float, count: int = 400) -> torch.Tensor:
    return MIXTURE.noised(count, sigma, torch.Generator().manual_seed(0))


def _one_step_errors(sigma: float, h: float) -> tuple[float, float]:
    x = _points(sigma)
    start, end = torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma - h, dtype=torch.float64)
    truth = ddim_reference(MIXTURE, x, sigma, sigma - h, steps=4000)
    curvature = Curvature(MIXTURE.denoise, method="jvp")
    eps, _ = curvature.epsilon(x, start)
    ddim = x + (end - start) * eps
    genie, _ = genie_step(curvature, x, start, end)
    return float((ddim - truth).norm(dim=1).mean()), float((genie - truth).norm(dim=1).mean())


@pytest.mark.parametrize("sigma", [0.2, 0.5])
def test_one_genie_step_is_third_order_and_beats_ddim(sigma: float) -> None:
    ddim_small, genie_small = _one_step_errors(sigma, 0.025)
    ddim_large, genie_large = _one_step_errors(sigma, 0.05)
    assert genie_small < ddim_small / 3 and genie_large < ddim_large
    # local error: DDIM O(h^2) (x4 when h doubles), GENIE O(h^3) (x8)
    assert 3.0 < ddim_large / ddim_small < 5.0
    assert genie_large / genie_small > 5.5


def _central_difference(
    x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, delta: float
) -> torch.Tensor:
    def eps_at(point: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return (point - MIXTURE.denoise(point, level)) / level

    return (eps_at(x + delta * eps, sigma + delta) - eps_at(x - delta * eps, sigma - delta)) / (2 * delta)


def test_the_jvp_equals_a_finite_difference_of_the_exact_denoiser() -> None:
    x = _points(0.5, 64)
    sigma = torch.tensor(0.5, dtype=torch.float64)
    exact = Curvature(MIXTURE.denoise, method="jvp")
    eps, _ = exact.epsilon(x, sigma)
    jvp = exact.derivative(x, sigma, eps)
    torch.testing.assert_close(_central_difference(x, sigma, eps, 1e-5), jvp, rtol=1e-6, atol=1e-6)
    assert exact.nfe == 3 and exact.fallback_reason is None
    # the sampler's own fallback: a central difference, two evaluations
    fallback = Curvature(MIXTURE.denoise, method="finite_difference")
    torch.testing.assert_close(fallback.derivative(x, sigma, eps), jvp, rtol=1e-4, atol=1e-4)
    assert fallback.nfe == 2


def _karras(steps: int, high: float = 2.0, low: float = 0.05, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def _ddim(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    for i in range(len(grid) - 1):
        x = x + (grid[i + 1] - grid[i]) * (x - MIXTURE.denoise(x, grid[i])) / grid[i]
    return x


@pytest.mark.parametrize("steps", [5, 10])
def test_genie_at_n_steps_is_closer_to_the_ode_solution_than_ddim_at_2n(steps: int) -> None:
    x = _points(2.0, 200)
    truth = ddim_reference(MIXTURE, x, 2.0, 0.05, steps=4000)
    genie = run_genie(Curvature(MIXTURE.denoise), x, _karras(steps))
    ddim = _ddim(x, _karras(2 * steps))
    assert float((genie - truth).norm(dim=1).mean()) < float((ddim - truth).norm(dim=1).mean())


def test_the_exact_curvature_runs_through_a_real_unet_with_cfg(
    sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Curvature] = []
    derivative = Curvature.derivative

    def recording(self: Curvature, *args: Any) -> torch.Tensor:
        seen.append(self)
        return derivative(self, *args)

    monkeypatch.setattr(Curvature, "derivative", recording)
    arguments: dict[str, Any] = {
        "seed": 42, "steps": 3, "cfg": 4.0, "sampler_name": "genie", "scheduler": "karras",
        "positive": make_cond(1), "negative": make_cond(2), "latent": {"samples": torch.zeros(1, 4, 8, 8)},
    }
    first = sample_latent(sd15, **arguments)["samples"]
    assert seen and all(curvature.fallback_reason is None for curvature in seen), seen[0].fallback_reason
    assert torch.isfinite(first).all()
    assert torch.equal(first, sample_latent(sd15, **arguments)["samples"])
    euler = sample_latent(sd15, **{**arguments, "sampler_name": "euler"})["samples"]
    assert not torch.equal(first, euler)


def test_the_unet_jvp_in_continuous_time_equals_a_finite_difference(
    sd15: DiffusionModel, make_cond: Callable[..., list[list[Any]]]
) -> None:
    denoiser = CFGDenoiser.build(sd15, make_cond(1), make_cond(2), 4.0, (1, 4, 8, 8))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for level in (8.0, 1.0):
        sigma = torch.tensor(level)
        exact = Curvature(denoiser, method="jvp")
        with torch.no_grad():
            eps, _ = exact.epsilon(x * level, sigma)
            jvp = exact.derivative(x * level, sigma, eps)
            difference = Curvature(denoiser, method="finite_difference").derivative(x * level, sigma, eps)
        assert exact.fallback_reason is None
        assert float((jvp - difference).norm() / difference.norm()) < 0.05, level


def test_continuous_timesteps_meet_the_training_timesteps_and_interpolate_between() -> None:
    schedule = DiscreteSchedule(ModelSampling())
    table = schedule.sigmas
    for index in (0, 1, 500, len(table) - 1):
        assert float(schedule.continuous_timestep(table[index])) == pytest.approx(index, abs=1e-3)
    between = (table[10].log() * 0.25 + table[11].log() * 0.75).exp()
    assert float(schedule.continuous_timestep(between)) == pytest.approx(10.75, abs=1e-3)
    # the discrete lookup ComfyUI uses is unchanged outside continuous time
    assert float(schedule.timestep(between)) == 11.0
