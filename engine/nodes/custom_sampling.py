"""ComfyUI's custom-sampling family: samplers, sigmas, noise and guiders as separate nodes.

SAMPLER is a :class:`~diffsplit.engine.sampling.samplers.Sampler`, SIGMAS a
float32 tensor ending in 0, NOISE a :class:`~diffsplit.engine.types.NoiseSource`
and GUIDER a :class:`~diffsplit.engine.types.Guider`. SamplerCustom and
SamplerCustomAdvanced run the same loop as KSampler over the given sigmas and
return the sampled latent and the last denoised prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.sampling import MAX_SEED
from diffsplit.engine.sampling import schedules
from diffsplit.engine.sampling.condition_scales import condition_log, pruner_factory
from diffsplit.engine.sampling.dual_cfg import guider_denoiser
from diffsplit.engine.sampling.ksampler import sample_with_sigmas
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES, Sampler, get_sampler
from diffsplit.engine.types import DiffusionModel, Guider, NoiseSource

_log = logging.getLogger(__name__)

Latent = dict[str, Any]
MAX_STEPS = 10000


def ksampler_select(ctx: NodeContext, *, sampler_name: str) -> tuple[Sampler]:
    """The sampler called ``sampler_name``."""
    return (get_sampler(sampler_name),)


def basic_scheduler(
    ctx: NodeContext, *, model: DiffusionModel, scheduler: str, steps: int, denoise: float
) -> tuple[torch.Tensor]:
    """The model's sigmas for ``steps`` (with ``denoise < 1``: the last ``steps`` of a longer run)."""
    if denoise <= 0.0:
        return (torch.zeros(0),)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return (schedules.sigmas(model.sampling, scheduler, total)[-(steps + 1) :],)


def karras_scheduler(
    ctx: NodeContext, *, steps: int, sigma_max: float, sigma_min: float, rho: float
) -> tuple[torch.Tensor]:
    """Karras sigmas between the given bounds."""
    return (schedules.karras_sigmas(steps, sigma_min, sigma_max, rho),)


def exponential_scheduler(
    ctx: NodeContext, *, steps: int, sigma_max: float, sigma_min: float
) -> tuple[torch.Tensor]:
    """Sigmas uniform in log space between the given bounds."""
    return (schedules.exponential_sigmas(steps, sigma_min, sigma_max),)


def sd_turbo_scheduler(
    ctx: NodeContext, *, model: DiffusionModel, steps: int, denoise: float
) -> tuple[torch.Tensor]:
    """SD-Turbo's schedule: timesteps 999, 899, ... (the first ``10 - 10 * denoise`` skipped)."""
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start : start + steps]
    values = schedules.DiscreteSchedule(model.sampling).sigma(timesteps.to(torch.float32))
    return (torch.cat([values, values.new_zeros(1)]),)


def split_sigmas(ctx: NodeContext, *, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmas up to ``step`` and from ``step`` on (the step's sigma is in both)."""
    return (sigmas[: step + 1], sigmas[step:])


def random_noise(ctx: NodeContext, *, noise_seed: int) -> tuple[NoiseSource]:
    """Start noise from ``noise_seed`` (the same noise KSampler draws for that seed)."""
    return (NoiseSource(int(noise_seed)),)


def disable_noise(ctx: NodeContext) -> tuple[NoiseSource]:
    """No start noise."""
    return (NoiseSource(None),)


def cfg_guider(
    ctx: NodeContext, *, model: DiffusionModel, positive: Any, negative: Any, cfg: float
) -> tuple[Guider]:
    """Classifier-free guidance with ``cfg``."""
    return (Guider(model, positive, negative, float(cfg)),)


def basic_guider(ctx: NodeContext, *, model: DiffusionModel, conditioning: Any) -> tuple[Guider]:
    """The model's prediction for ``conditioning`` alone (no negative, scale 1)."""
    return (Guider(model, conditioning, [], 1.0),)


def _run(
    ctx: NodeContext,
    guider: Guider,
    noise: NoiseSource,
    sampler: Sampler,
    sigmas: torch.Tensor,
    latent: Latent,
    *,
    seed: int | None = None,
) -> tuple[Latent, Latent]:
    """Sample; ``seed`` seeds the sampler's own noise (SDE samplers), by default the start noise's seed.

    As in ComfyUI, SamplerCustom passes its ``noise_seed`` even without start
    noise, while DisableNoise in SamplerCustomAdvanced means seed 0.
    """
    if seed is None:
        seed = noise.seed if noise.seed is not None else 0
    denoiser = guider_denoiser(guider)
    log = condition_log(ctx)
    if denoiser is not None and log is not None and _steered(guider.positive, guider.middle, guider.negative):
        _log.warning("node %s: the conditioning scale estimator weighs CFG guidance only; under "
                     "DualCFGGuider every ControlNet condition runs", ctx.node_id)
    return sample_with_sigmas(
        guider.model,
        sigmas.to(torch.float32),
        sampler,
        seed=seed,
        add_noise=noise.seed is not None,
        cfg=guider.cfg,
        positive=guider.positive,
        negative=guider.negative,
        latent=latent,
        progress=ctx.progress,
        denoiser=denoiser,
        pruner=None if denoiser is not None else pruner_factory(log, ctx.node_id),
    )


def _steered(*conditionings: Any) -> bool:
    """Whether any entry of the CONDITIONING lists carries a ControlNet or T2I-Adapter hint."""
    return any(isinstance(entry, list | tuple) and len(entry) > 1 and isinstance(entry[1], dict)
               and entry[1].get("control") is not None
               for conditioning in conditionings if conditioning for entry in conditioning)


def sampler_custom(
    ctx: NodeContext,
    *,
    model: DiffusionModel,
    add_noise: bool,
    noise_seed: int,
    cfg: float,
    positive: Any,
    negative: Any,
    sampler: Sampler,
    sigmas: torch.Tensor,
    latent_image: Latent,
) -> tuple[Latent, Latent]:
    """A sampler run over ``sigmas`` with CFG; outputs the latent and the last denoised prediction."""
    noise = NoiseSource(int(noise_seed) if add_noise else None)
    guider = Guider(model, positive, negative, float(cfg))
    return _run(ctx, guider, noise, sampler, sigmas, latent_image, seed=int(noise_seed))


def sampler_custom_advanced(
    ctx: NodeContext,
    *,
    noise: NoiseSource,
    guider: Guider,
    sampler: Sampler,
    sigmas: torch.Tensor,
    latent_image: Latent,
) -> tuple[Latent, Latent]:
    """SamplerCustom with the noise and the guidance as inputs of their own."""
    return _run(ctx, guider, noise, sampler, sigmas, latent_image)


_SIGMAS = (OutputSpec("SIGMAS", "SIGMAS"),)
_STEPS = InputSpec("steps", "INT", default=20, min=1, max=MAX_STEPS)
_DENOISE = InputSpec("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01)
_SIGMA_MAX = InputSpec("sigma_max", "FLOAT", default=14.614642, min=0.0, max=5000.0, step=0.01)
_SIGMA_MIN = InputSpec("sigma_min", "FLOAT", default=0.0291675, min=0.0, max=5000.0, step=0.01)
_OUTPUTS = (OutputSpec("output", "LATENT"), OutputSpec("denoised_output", "LATENT"))
_NOISE_SEED = InputSpec("noise_seed", "INT", default=0, min=0, max=MAX_SEED, control_after_generate=True)
_CFG = InputSpec("cfg", "FLOAT", default=8.0, min=0.0, max=100.0, step=0.1)

NODES: tuple[NodeClass, ...] = (
    NodeClass(
        "KSamplerSelect",
        (InputSpec("sampler_name", "COMBO", choices=SAMPLER_NAMES),),
        (OutputSpec("SAMPLER", "SAMPLER"),),
        ksampler_select,
        category="sampling/custom_sampling",
    ),
    NodeClass(
        "BasicScheduler",
        (
            InputSpec("model", "MODEL"),
            InputSpec("scheduler", "COMBO", choices=schedules.SCHEDULER_NAMES),
            _STEPS,
            _DENOISE,
        ),
        _SIGMAS,
        basic_scheduler,
        category="sampling/custom_sampling/schedulers",
    ),
    NodeClass(
        "KarrasScheduler",
        (
            _STEPS,
            _SIGMA_MAX,
            _SIGMA_MIN,
            InputSpec("rho", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.01),
        ),
        _SIGMAS,
        karras_scheduler,
        category="sampling/custom_sampling/schedulers",
    ),
    NodeClass(
        "ExponentialScheduler",
        (_STEPS, _SIGMA_MAX, _SIGMA_MIN),
        _SIGMAS,
        exponential_scheduler,
        category="sampling/custom_sampling/schedulers",
    ),
    NodeClass(
        "SDTurboScheduler",
        (InputSpec("model", "MODEL"), InputSpec("steps", "INT", default=1, min=1, max=10), _DENOISE),
        _SIGMAS,
        sd_turbo_scheduler,
        category="sampling/custom_sampling/schedulers",
    ),
    NodeClass(
        "SplitSigmas",
        (InputSpec("sigmas", "SIGMAS"), InputSpec("step", "INT", default=0, min=0, max=MAX_STEPS)),
        (OutputSpec("high_sigmas", "SIGMAS"), OutputSpec("low_sigmas", "SIGMAS")),
        split_sigmas,
        category="sampling/custom_sampling/sigmas",
    ),
    NodeClass(
        "RandomNoise",
        (_NOISE_SEED,),
        (OutputSpec("NOISE", "NOISE"),),
        random_noise,
        category="sampling/custom_sampling/noise",
    ),
    NodeClass(
        "DisableNoise",
        (),
        (OutputSpec("NOISE", "NOISE"),),
        disable_noise,
        category="sampling/custom_sampling/noise",
    ),
    NodeClass(
        "CFGGuider",
        (
            InputSpec("model", "MODEL"),
            InputSpec("positive", "CONDITIONING"),
            InputSpec("negative", "CONDITIONING"),
            _CFG,
        ),
        (OutputSpec("GUIDER", "GUIDER"),),
        cfg_guider,
        category="sampling/custom_sampling/guiders",
    ),
    NodeClass(
        "BasicGuider",
        (InputSpec("model", "MODEL"), InputSpec("conditioning", "CONDITIONING")),
        (OutputSpec("GUIDER", "GUIDER"),),
        basic_guider,
        category="sampling/custom_sampling/guiders",
    ),
    NodeClass(
        "SamplerCustom",
        (
            InputSpec("model", "MODEL"),
            InputSpec("add_noise", "BOOLEAN", default=True),
            _NOISE_SEED,
            _CFG,
            InputSpec("positive", "CONDITIONING"),
            InputSpec("negative", "CONDITIONING"),
            InputSpec("sampler", "SAMPLER"),
            InputSpec("sigmas", "SIGMAS"),
            InputSpec("latent_image", "LATENT"),
        ),
        _OUTPUTS,
        sampler_custom,
        category="sampling/custom_sampling",
        prunes_conditions=True,
    ),
    NodeClass(
        "SamplerCustomAdvanced",
        (
            InputSpec("noise", "NOISE"),
            InputSpec("guider", "GUIDER"),
            InputSpec("sampler", "SAMPLER"),
            InputSpec("sigmas", "SIGMAS"),
            InputSpec("latent_image", "LATENT"),
        ),
        _OUTPUTS,
        sampler_custom_advanced,
        category="sampling/custom_sampling",
        prunes_conditions=True,
    ),
)
