"""UniPC (Zhao et al. 2023) multistep predictor-corrector, data prediction, in sigma space.

ComfyUI runs UniPC in the variance-preserving frame with the model wrapped as a
data predictor; dividing that frame by alpha gives the same updates on the
k-diffusion latent ``x = x0 + sigma * eps`` with ``lambda = -log(sigma)``:

    x_t = (sigma_t / sigma_s) x_s - expm1(-h) m_s - B(h) * sum_k rho_k D_k

where ``m`` are the denoised predictions of previous steps and ``D_k`` their
scaled differences. ``bh1`` uses ``B(h) = -h`` (ComfyUI's ``uni_pc``), ``bh2``
``B(h) = expm1(-h)`` (``uni_pc_bh2``). As in ComfyUI, a final sigma of 0 is
replaced by 0.001, the order is ``min(3, steps - 1)`` with lower orders for the
first and last steps, and the last step has no corrector (no extra model call).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from diffsplit.engine.sampling.samplers import DenoiseFn, StepCallback

Variant = Literal["bh1", "bh2"]

_FINAL_SIGMA = 0.001


def _coefficients(
    rks: list[float], h: float, order: int, variant: Variant
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """UniPC's matrix R, vector b and B(h) for the step (data prediction, so hh = -h)."""
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, rhs = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64), b_h


def _weighted(weights: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | float:
    total: torch.Tensor | float = 0.0
    for weight, tensor in zip(weights.tolist(), tensors, strict=True):
        total = total + weight * tensor
    return total


def _update(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    sigma_t: torch.Tensor,
    order: int,
    variant: Variant,
    use_corrector: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step from the newest history point to ``sigma_t``; returns (x_t, model output at t)."""
    sigma_0, model_0 = history[-1]
    lambda_0 = -math.log(sigma_0)
    h = -math.log(float(sigma_t)) - lambda_0
    rks, differences = [], []
    for i in range(1, order):
        sigma_i, model_i = history[-(i + 1)]
        rk = (-math.log(sigma_i) - lambda_0) / h
        rks.append(rk)
        differences.append((model_i - model_0) / rk)
    rks.append(1.0)
    matrix, rhs, b_h = _coefficients(rks, h, order, variant)

    x_base = (float(sigma_t) / sigma_0) * x - math.expm1(-h) * model_0
    if differences:
        rhos_p = (
            torch.tensor([0.5], dtype=torch.float64)
            if order == 2
            else torch.linalg.solve(matrix[:-1, :-1], rhs[:-1])
        )
        x_t = x_base - b_h * _weighted(rhos_p, differences)
    else:
        x_t = x_base
    if not use_corrector:
        return x_t, None
    model_t = denoise_fn(x_t, sigma_t)
    rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(matrix, rhs)
    correction = _weighted(rhos_c[:-1], differences) + float(rhos_c[-1]) * (model_t - model_0)
    return x_base - b_h * correction, model_t


def _sample(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    variant: Variant,
    callback: StepCallback | None,
) -> torch.Tensor:
    sigmas = sigmas.clone()
    if sigmas[-1] == 0:
        sigmas[-1] = _FINAL_SIGMA
    steps = len(sigmas) - 1
    order = max(1, min(3, steps - 1))
    denoised = denoise_fn(x, sigmas[0])
    history: list[tuple[float, torch.Tensor]] = [(float(sigmas[0]), denoised)]
    for step in range(1, steps + 1):
        step_order = min(step, order, steps + 1 - step)
        use_corrector = step < steps
        x, model_t = _update(denoise_fn, x, history, sigmas[step], step_order, variant, use_corrector)
        if step < steps:
            if model_t is None:
                model_t = denoise_fn(x, sigmas[step])
            history = [*history, (float(sigmas[step]), model_t)][-order:]
        if callback is not None:
            callback(step - 1, x, history[-1][1])
    return x


def sample_unipc(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC with B(h) = -h (ComfyUI's ``uni_pc``); deterministic, ``generator`` is unused."""
    return _sample(denoise_fn, x, sigmas, "bh1", callback)


def sample_unipc_bh2(
    denoise_fn: DenoiseFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC with B(h) = expm1(-h) (ComfyUI's ``uni_pc_bh2``); deterministic, ``generator`` is unused."""
    return _sample(denoise_fn, x, sigmas, "bh2", callback)
