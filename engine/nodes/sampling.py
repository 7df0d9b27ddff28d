"""Sampler nodes: KSampler and KSamplerAdvanced, declared exactly as ComfyUI declares them.

Both run :func:`diffsplit.engine.sampling.ksampler.sample_latent` and report
progress once per step through ``ctx.progress``. KSamplerAdvanced's window
(``start_at_step``/``end_at_step``) lets a base model stop with noise left
(``return_with_leftover_noise = enable``) and a second sampler continue without
adding noise (``add_noise = disable``), the SDXL base + refiner hand-off.
"""

from __future__ import annotations

from typing import Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.sampling.condition_scales import condition_log, pruner_factory
from diffsplit.engine.sampling.ksampler import sample_latent
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES
from diffsplit.engine.sampling.schedules import SCHEDULER_NAMES
from diffsplit.engine.types import DiffusionModel

Latent = dict[str, Any]
Conditioning = list[list[Any]]

#: ComfyUI's seed range: any unsigned 64-bit integer.
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_STEPS = 10000


def _check_names(sampler_name: str, scheduler: str) -> None:
    if sampler_name not in SAMPLER_NAMES:
        raise WorkflowError(
            f"unknown sampler {sampler_name!r}; known: {', '.join(SAMPLER_NAMES)}", input_name="sampler_name"
        )
    if scheduler not in SCHEDULER_NAMES:
        raise WorkflowError(
            f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULER_NAMES)}", input_name="scheduler"
        )


def ksampler(
    ctx: NodeContext,
    *,
    model: DiffusionModel,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    denoise: float = 1.0,
) -> tuple[Latent]:
    """ComfyUI KSampler: denoise ``latent_image`` from noise seeded with ``seed``."""
    _check_names(sampler_name, scheduler)
    latent = sample_latent(
        model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent=latent_image,
        denoise=denoise,
        progress=ctx.progress,
        pruner=pruner_factory(condition_log(ctx), ctx.node_id),
    )
    return (latent,)


def ksampler_advanced(
    ctx: NodeContext,
    *,
    model: DiffusionModel,
    add_noise: str,
    noise_seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    start_at_step: int,
    end_at_step: int,
    return_with_leftover_noise: str,
) -> tuple[Latent]:
    """ComfyUI KSamplerAdvanced: sample steps ``start_at_step`` to ``end_at_step`` of a ``steps`` schedule."""
    _check_names(sampler_name, scheduler)
    latent = sample_latent(
        model,
        seed=noise_seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent=latent_image,
        add_noise=add_noise != "disable",
        start_step=start_at_step,
        last_step=end_at_step,
        force_full_denoise=return_with_leftover_noise != "enable",
        progress=ctx.progress,
        pruner=pruner_factory(condition_log(ctx), ctx.node_id),
    )
    return (latent,)


def _common_inputs() -> tuple[InputSpec, ...]:
    """steps .. latent_image, shared by both samplers in ComfyUI's order."""
    return (
        InputSpec("steps", "INT", default=20, min=1, max=MAX_STEPS),
        InputSpec("cfg", "FLOAT", default=8.0, min=0.0, max=100.0, step=0.1),
        InputSpec("sampler_name", "COMBO", default=SAMPLER_NAMES[0], choices=SAMPLER_NAMES),
        InputSpec("scheduler", "COMBO", default=SCHEDULER_NAMES[0], choices=SCHEDULER_NAMES),
        InputSpec("positive", "CONDITIONING"),
        InputSpec("negative", "CONDITIONING"),
        InputSpec("latent_image", "LATENT"),
    )


def _seed(name: str) -> InputSpec:
    return InputSpec(name, "INT", default=0, min=0, max=MAX_SEED, control_after_generate=True)


_LATENT_OUT = (OutputSpec("LATENT", "LATENT"),)

KSAMPLER = NodeClass(
    name="KSampler",
    inputs=(
        InputSpec("model", "MODEL"),
        _seed("seed"),
        *_common_inputs(),
        InputSpec("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
    ),
    outputs=_LATENT_OUT,
    function=ksampler,
    category="sampling",
    prunes_conditions=True,
    description="Denoise a latent with a model, prompts and a sampler/scheduler pair.",
)

KSAMPLER_ADVANCED = NodeClass(
    name="KSamplerAdvanced",
    inputs=(
        InputSpec("model", "MODEL"),
        InputSpec("add_noise", "COMBO", default="enable", choices=("enable", "disable")),
        _seed("noise_seed"),
        *_common_inputs(),
        InputSpec("start_at_step", "INT", default=0, min=0, max=MAX_STEPS),
        InputSpec("end_at_step", "INT", default=MAX_STEPS, min=0, max=MAX_STEPS),
        InputSpec("return_with_leftover_noise", "COMBO", default="disable", choices=("disable", "enable")),
    ),
    outputs=_LATENT_OUT,
    function=ksampler_advanced,
    category="sampling",
    prunes_conditions=True,
    description="KSampler over a window of steps, optionally without adding noise or finishing the denoise.",
)

NODES: tuple[NodeClass, ...] = (KSAMPLER, KSAMPLER_ADVANCED)
