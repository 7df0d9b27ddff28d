"""One KSampler run, ComfyUI's ``common_ksampler``: noise, sigmas, inpainting, the sampler loop.

- sigmas: ``scheduler`` for ``steps`` (``dpm_2``/``uni_pc``: one more, penultimate
  dropped); with ``denoise < 1`` for ``int(steps / denoise)`` steps, keeping the
  last ``steps + 1``; then ``[start_step : last_step + 1]`` with the last sigma
  forced to 0 when ``force_full_denoise`` cut the run short.
- start: ``x = latent + noise * sigmas[0]``; when ``sigmas[0]`` is the model's
  sigma_max (a full denoise), the noise is scaled by ``sqrt(1 + sigma_max^2)``
  as ComfyUI does. ``add_noise=False`` uses zero noise.
- ``noise_mask`` in the LATENT: inpainting (:class:`InpaintDenoiser`), with the
  start noise held outside the mask (``ddim``: noise from ``seed + 1``).
- stochastic samplers draw their extra noise from a CPU generator seeded with ``seed``.

Latents are in the UNet's (scaled) space; results come back float32 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from diffsplit.engine.sampling import schedules
from diffsplit.engine.sampling.condition_scales import ConditionPruner, PrunerFactory
from diffsplit.engine.sampling.denoiser import CFGDenoiser, InpaintDenoiser, prepare_denoise_mask
from diffsplit.engine.sampling.noise import prepare_noise, seeded_generator
from diffsplit.engine.sampling.samplers import DenoiseFn, Sampler, get_sampler
from diffsplit.engine.types import DiffusionModel, ModelSampling

ProgressFn = Callable[[int, int], None]

_FULL_DENOISE = 0.9999


def ksampler_sigmas(
    model_sampling: ModelSampling, scheduler: str, sampler: Sampler, steps: int, denoise: float = 1.0
) -> torch.Tensor:
    """The sigmas of a KSampler run (empty when ``denoise <= 0``: nothing to do)."""
    if denoise > _FULL_DENOISE:
        return _scheduled(model_sampling, scheduler, sampler, steps)
    if denoise <= 0.0:
        return torch.zeros(0)
    total = _scheduled(model_sampling, scheduler, sampler, int(steps / denoise))
    return total[-(steps + 1) :]


def _scheduled(model_sampling: ModelSampling, scheduler: str, sampler: Sampler, steps: int) -> torch.Tensor:
    if not sampler.discards_penultimate_sigma:
        return schedules.sigmas(model_sampling, scheduler, steps)
    longer = schedules.sigmas(model_sampling, scheduler, steps + 1)
    return torch.cat([longer[:-2], longer[-1:]])


def slice_sigmas(
    sigmas: torch.Tensor, start_step: int | None, last_step: int | None, force_full_denoise: bool
) -> torch.Tensor:
    """KSamplerAdvanced's window of the schedule; empty when ``start_step`` leaves no step to run."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return sigmas[:0]
        sigmas = sigmas[start_step:]
    return sigmas


def sample_latent(
    model: DiffusionModel,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Sequence[Sequence[Any]],
    negative: Sequence[Sequence[Any]],
    latent: Mapping[str, Any],
    denoise: float = 1.0,
    add_noise: bool = True,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
    progress: ProgressFn | None = None,
    pruner: PrunerFactory | None = None,
) -> dict[str, Any]:
    """Sample ``latent`` and return a copy of the LATENT dict with new ``samples``.

    ``pruner``: the conditioning scale estimator's factory (``--conditions auto``), or None.
    Raises ValueError for an unknown sampler or scheduler name.
    """
    sampler = get_sampler(sampler_name)
    sigmas = ksampler_sigmas(model.sampling, scheduler, sampler, steps, denoise)
    sigmas = slice_sigmas(sigmas, start_step, last_step, force_full_denoise)
    output, _ = sample_with_sigmas(
        model, sigmas, sampler, seed=seed, add_noise=add_noise, cfg=cfg, positive=positive,
        negative=negative, latent=latent, progress=progress, pruner=pruner,
    )
    return output


def sample_with_sigmas(
    model: DiffusionModel,
    sigmas: torch.Tensor,
    sampler: Sampler,
    *,
    seed: int,
    add_noise: bool,
    cfg: float,
    positive: Sequence[Sequence[Any]],
    negative: Sequence[Sequence[Any]],
    latent: Mapping[str, Any],
    progress: ProgressFn | None = None,
    denoiser: Callable[[tuple[int, ...], int], DenoiseFn] | None = None,
    pruner: PrunerFactory | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One sampler run over given ``sigmas`` (KSampler and SamplerCustom share it).

    Returns the sampled LATENT and the LATENT of the last denoised prediction
    (SamplerCustom's ``denoised_output``; the input latent when there is no step).
    ``denoiser(latent_shape, seed)``, when given, builds the guidance instead of
    CFG over ``positive``/``negative`` (DualCFGGuider). ``pruner(schedule, sigmas)`` makes the
    conditioning scale estimator of a CFG run (``engine.sampling.condition_scales``).
    """
    result = dict(latent)
    latent_image = latent["samples"].float()
    if len(sigmas) == 0:
        result["samples"] = latent_image.clone()
        return result, {**result, "samples": latent_image.clone()}
    if add_noise:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros_like(latent_image)
    device = next(model.unet.parameters()).device
    latent_image, noise, sigmas = latent_image.to(device), noise.to(device), sigmas.to(device)

    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probe: ConditionPruner | None = None
    if denoiser is not None:
        denoise_fn = denoiser(tuple(latent_image.shape), seed)
    else:
        estimator = None if pruner is None else partial(pruner, sigmas=sigmas)
        cfg_denoiser = CFGDenoiser.build(model, positive, negative, cfg, latent_image.shape, seed=seed,
                                         pruner=estimator)
        denoise_fn = cfg_denoiser
        probe = cfg_denoiser.pruner
    if latent.get("noise_mask") is not None:
        held_noise = noise
        if sampler.random_inpaint_noise:
            held_noise = torch.randn(noise.shape, generator=seeded_generator(seed + 1)).to(noise)
        mask = prepare_denoise_mask(latent["noise_mask"], latent_image.shape).to(device)
        denoise_fn = InpaintDenoiser(denoise_fn, latent_image, held_noise, mask)

    x = latent_image + noise * start_noise_scale(model.sampling, float(sigmas[0]))
    total = len(sigmas) - 1
    last_denoised = [latent_image]

    def on_step(step: int, x_now: torch.Tensor, denoised: torch.Tensor) -> None:
        last_denoised[0] = denoised
        if probe is not None:
            probe.step_done(step)
        if progress is not None:
            progress(step + 1, total)

    with torch.no_grad():
        samples = sampler.function(denoise_fn, x, sigmas, generator=seeded_generator(seed), callback=on_step)
    result["samples"] = samples.float().cpu()
    return result, {**result, "samples": last_denoised[0].float().cpu()}


def start_noise_scale(model_sampling: ModelSampling, sigma: float) -> float:
    """ComfyUI's noise_scaling: sqrt(1 + sigma^2) at the model's sigma_max (full denoise), else sigma."""
    sigma_max = float(schedules.DiscreteSchedule(model_sampling).sigma_max)
    if math.isclose(sigma, sigma_max, rel_tol=1e-5) or sigma > sigma_max:
        return math.sqrt(1.0 + sigma**2)
    return sigma
