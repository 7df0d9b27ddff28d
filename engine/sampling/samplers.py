"""k-diffusion samplers as ComfyUI runs them, on any ``denoise_fn(x, sigma) -> denoised``.

Every sampler has the signature
``fn(denoise_fn, x, sigmas, *, generator=None, callback=None) -> Tensor``:
``x`` is the noised start latent at ``sigmas[0]``, ``sigmas`` the descending
schedule, ``generator`` the CPU generator stochastic samplers draw their extra
noise from (seeded with the sampling seed, as ComfyUI does; ``None`` means a
generator seeded with 0), and ``callback(step, x, denoised)`` is called once per
step, after the step's last model evaluation (``x`` is the step's start, ``denoised`` its first
prediction, as k-diffusion passes them; what a callback changes in the denoiser acts from the
next step on: the conditioning scale estimator relies on it). Update rules follow
k-diffusion with ComfyUI's defaults (eta = 1, s_noise = 1, no churn). The SDE samplers draw
from torchsde's Brownian tree seeded with the sampling seed, as ComfyUI does; their ``_gpu`` variants are the
same samplers (noise is always drawn on the CPU here, so they match the CPU
variants bit for bit rather than ComfyUI's CUDA trees).

:func:`get_sampler` returns a :class:`Sampler`: the function plus the two
ComfyUI quirks the caller needs (``dpm_2``/``uni_pc`` compute one extra step
and drop the penultimate sigma; ``ddim`` is ``euler`` whose inpainting noise is
redrawn from ``seed + 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from diffsplit.engine.sampling.deterministic import sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun
from diffsplit.engine.sampling.genie import sample_genie, sample_genie_head
from diffsplit.engine.sampling.multistep import sample_dpmpp_3m_sde, sample_lms
from diffsplit.engine.sampling.stochastic import (
    sample_ddpm,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler_ancestral,
    sample_lcm,
)
from diffsplit.engine.sampling.unipc import sample_unipc, sample_unipc_bh2

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class SamplerFunction(Protocol):
    """A sampling loop: returns the sample at ``sigmas[-1]``."""

    def __call__(
        self,
        denoise_fn: DenoiseFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Sampler:
    """A named sampler and how ComfyUI prepares its run."""

    name: str
    function: SamplerFunction
    #: compute sigmas for steps + 1 and drop the penultimate one (ComfyUI: dpm_2, uni_pc)
    discards_penultimate_sigma: bool = False
    #: inpainting noise comes from a generator seeded with seed + 1 (ComfyUI: ddim)
    random_inpaint_noise: bool = False


_SAMPLERS: MappingProxyType[str, Sampler] = MappingProxyType(
    {
        sampler.name: sampler
        for sampler in (
            Sampler("euler", sample_euler),
            Sampler("euler_ancestral", sample_euler_ancestral),
            Sampler("heun", sample_heun),
            Sampler("dpm_2", sample_dpm_2, discards_penultimate_sigma=True),
            Sampler("dpm_2_ancestral", sample_dpm_2_ancestral, discards_penultimate_sigma=True),
            Sampler("lms", sample_lms),
            Sampler("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral),
            Sampler("dpmpp_sde", sample_dpmpp_sde),
            Sampler("dpmpp_sde_gpu", sample_dpmpp_sde),
            Sampler("dpmpp_2m", sample_dpmpp_2m),
            Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde),
            Sampler("dpmpp_2m_sde_gpu", sample_dpmpp_2m_sde),
            Sampler("dpmpp_3m_sde", sample_dpmpp_3m_sde),
            Sampler("dpmpp_3m_sde_gpu", sample_dpmpp_3m_sde),
            Sampler("ddpm", sample_ddpm),
            Sampler("lcm", sample_lcm),
            Sampler("ddim", sample_euler, random_inpaint_noise=True),
            Sampler("uni_pc", sample_unipc, discards_penultimate_sigma=True),
            Sampler("uni_pc_bh2", sample_unipc_bh2, discards_penultimate_sigma=True),
            Sampler("genie", sample_genie),
            Sampler("genie_head", sample_genie_head),
        )
    }
)

#: The sampler names this engine runs, in ComfyUI's order.
SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; ValueError listing the known names otherwise."""
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLER_NAMES)}") from None
