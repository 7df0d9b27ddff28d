"""Deterministic k-diffusion samplers (ODE solvers) and the step arithmetic all samplers share.

Update rules follow k-diffusion with ComfyUI's defaults (no churn). Each
sampler is ``fn(denoise_fn, x, sigmas, *, generator=None, callback=None)``;
``generator`` is accepted for a uniform signature and unused here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffsplit.engine.sampling.noise import seeded_generator

if TYPE_CHECKING:
    from diffsplit.engine.sampling.samplers import DenoiseFn, StepCallback


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) for an ancestral step with eta = 1."""
    sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def lambda_of(sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion's time variable t = -log(sigma) (half the log signal-to-noise ratio)."""
    return sigma.log().neg()


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`lambda_of`."""
    return t.neg().exp()


def generator_or_default(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a CPU generator seeded with 0 when None."""
    return generator if generator is not None else seeded_generator(0)


def notify(callback: StepCallback | None, step: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """Call ``callback(step, x, denoised)`` if there is one."""
    if callback is not None:
        callback(step, x, denoised)


def log_midpoint(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The geometric mean of two sigmas (the midpoint in log-sigma)."""
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()


def sample_euler(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun's second-order method (Euler on the last step)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x_next = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoise_fn(x_2, sigmas[i + 1]))
            x_next = x + (d + d_2) / 2 * dt
        notify(callback, i, x, denoised)
        x = x_next
    return x


def sample_dpm_2(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 (the midpoint method in log-sigma), Euler on the last step."""
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x_next = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = log_midpoint(sigmas[i], sigmas[i + 1])
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoise_fn(x_2, sigma_mid))
            x_next = x + d_2 * (sigmas[i + 1] - sigmas[i])
        notify(callback, i, x, denoised)
        x = x_next
    return x


def sample_dpmpp_2m(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-sigma."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - lambda_of(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised
        x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x
