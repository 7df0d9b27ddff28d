"""Stochastic k-diffusion samplers: ancestral, SDE, DDPM and LCM steps that add fresh noise.

Extra noise comes from ``generator`` (a CPU generator; the KSampler seeds it
with the sampling seed, as ComfyUI does): independent ``randn`` draws for the
ancestral samplers, DDPM and LCM; torchsde's Brownian tree over sigma, seeded
with the sampling seed as ComfyUI seeds it, for ``dpmpp_sde`` and ``dpmpp_2m_sde``.
ComfyUI's defaults: eta = 1, s_noise = 1, r = 1/2, the midpoint 2M-SDE variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffsplit.engine.sampling.deterministic import (
    ancestral_step,
    generator_or_default,
    lambda_of,
    log_midpoint,
    notify,
    sigma_of,
    to_d,
)
from diffsplit.engine.sampling.noise import BrownianTreeNoiseSampler, GaussianNoiseSampler

if TYPE_CHECKING:
    from diffsplit.engine.sampling.samplers import DenoiseFn, StepCallback


def sample_euler_ancestral(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler steps down to sigma_down, then fresh noise up to the next sigma."""
    noise = GaussianNoiseSampler(x, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def sample_dpm_2_ancestral(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral DPM-Solver-2."""
    noise = GaussianNoiseSampler(x, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x_next = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, denoise_fn(x_2, sigma_mid))
            x_next = x + d_2 * (sigma_down - sigmas[i])
            x_next = x_next + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        notify(callback, i, x, denoised)
        x = x_next
    return x


def sample_dpmpp_2s_ancestral(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S)."""
    noise = GaussianNoiseSampler(x, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x_next = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = lambda_of(sigmas[i]), lambda_of(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_of(s) / sigma_of(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoise_fn(x_2, sigma_of(s))
            x_next = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_2
        notify(callback, i, x, denoised)
        x = x_next
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def sample_dpmpp_sde(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, r = 1/2), with Brownian-path noise."""
    if len(sigmas) <= 1:
        return x
    noise = BrownianTreeNoiseSampler.for_run(x, sigmas, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        if sigmas[i + 1] == 0:
            notify(callback, i, x, denoised)
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        s = t + (t_next - t) / 2
        sigma_down, sigma_up = ancestral_step(sigma_of(t), sigma_of(s))
        s_down = lambda_of(sigma_down)
        x_2 = (sigma_of(s_down) / sigma_of(t)) * x - (t - s_down).expm1() * denoised
        x_2 = x_2 + noise(sigma_of(t), sigma_of(s)) * sigma_up
        denoised_2 = denoise_fn(x_2, sigma_of(s))
        notify(callback, i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma_of(t), sigma_of(t_next))
        t_next_down = lambda_of(sigma_down)
        x = (sigma_of(t_next_down) / sigma_of(t)) * x - (t - t_next_down).expm1() * denoised_2
        x = x + noise(sigma_of(t), sigma_of(t_next)) * sigma_up
    return x


def sample_dpmpp_2m_sde(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant, with Brownian-path noise."""
    if len(sigmas) <= 1:
        return x
    noise = BrownianTreeNoiseSampler.for_run(x, sigmas, generator_or_default(generator))
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = lambda_of(sigmas[i + 1]) - lambda_of(sigmas[i])
            x = sigmas[i + 1] / sigmas[i] * (-h).exp() * x + (-2 * h).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                x = x + 0.5 * (-2 * h).expm1().neg() * (h / h_last) * (denoised - old_denoised)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
    return x


def sample_ddpm(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM steps in the variance-preserving frame (ComfyUI's ``ddpm``)."""
    noise = GaussianNoiseSampler(x, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, sigma)
        notify(callback, i, x, denoised)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2)
        alpha_cumprod = 1 / (sigma**2 + 1)
        alpha_cumprod_next = 1 / (sigma_next**2 + 1)
        alpha = alpha_cumprod / alpha_cumprod_next
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
        if sigma_next > 0:
            variance = (1 - alpha) * (1.0 - alpha_cumprod_next) / (1.0 - alpha_cumprod)
            x = x + variance.sqrt() * noise(sigma, sigma_next)
            x = x * torch.sqrt(1.0 + sigma_next**2)
    return x


def sample_lcm(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Latent consistency sampling: jump to the denoised latent, renoise to the next sigma."""
    noise = GaussianNoiseSampler(x, generator_or_default(generator))
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x
