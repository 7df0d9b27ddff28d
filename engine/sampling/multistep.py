"""Linear multistep (``lms``) and DPM-Solver++(3M) SDE (``dpmpp_3m_sde``), as k-diffusion/ComfyUI run them.

``lms`` integrates the Lagrange polynomial through the last four derivatives
over each step (scipy's ``quad``, relative tolerance 1e-4, as k-diffusion);
``dpmpp_3m_sde`` is the third-order multistep SDE solver with eta = 1 and
torchsde's Brownian tree seeded with the sampling seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffsplit.engine.sampling.deterministic import generator_or_default, notify, to_d
from diffsplit.engine.sampling.noise import BrownianTreeNoiseSampler

if TYPE_CHECKING:
    from diffsplit.engine.sampling.samplers import DenoiseFn, StepCallback

#: k-diffusion's default order for lms.
LMS_ORDER = 4


def linear_multistep_coefficient(order: int, times: list[float], i: int, j: int) -> float:
    """The weight of derivative ``i - j`` over step ``i`` (the integral of its Lagrange basis polynomial)."""
    from scipy import integrate

    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")

    def basis(tau: float) -> float:
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - times[i - k]) / (times[i - j] - times[i - k])
        return product

    return float(integrate.quad(basis, times[i], times[i + 1], epsrel=1e-4)[0])


def sample_lms(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Linear multistep in sigma, order 4."""
    times = sigmas.detach().cpu().numpy().tolist()
    derivatives: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        derivatives.append(to_d(x, sigmas[i], denoised))
        if len(derivatives) > LMS_ORDER:
            derivatives.pop(0)
        notify(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        order = min(i + 1, LMS_ORDER)
        coefficients = [linear_multistep_coefficient(order, times, i, j) for j in range(order)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives), strict=True))
    return x


def sample_dpmpp_3m_sde(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE with Brownian-tree noise (eta = 1, s_noise = 1)."""
    if len(sigmas) <= 1:
        return x
    noise = BrownianTreeNoiseSampler.for_run(x, sigmas, generator_or_default(generator))
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoise_fn(x, sigmas[i])
        notify(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * 2  # eta + 1
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                r = h_1 / h
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / r)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
