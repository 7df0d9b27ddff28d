"""Samplers for plain diffusers code: ``diffsplit.samplers.genie(pipe)``.

::

    pipe.scheduler = diffsplit.samplers.genie(pipe)                  # exact curvature, by JVP
    image = pipe("a lighthouse at dusk", num_inference_steps=8).images[0]
    pipe.scheduler.nfe                                               # evaluations spent (a JVP is two)

    pipe.scheduler = diffsplit.samplers.genie(pipe, head="heads/tiny-sd15-genie.safetensors")
    # a distilled head (``diffsplit genie distill``): one UNet call per step

The scheduler is :class:`~diffsplit.engine.sampling.genie_scheduler.GenieScheduler`;
its docstring says how the curvature is computed and which pipelines it refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsplit.engine.sampling.genie_scheduler import (
    CurvatureChoice,
    GenieScheduler,
    GenieSchedulerError,
    GenieStepOutput,
)

__all__ = ["GenieScheduler", "GenieSchedulerError", "GenieStepOutput", "genie"]


def genie(
    pipeline: Any,
    *,
    curvature: CurvatureChoice | None = None,
    head: str | Path | torch.nn.Module | None = None,
    rho: float = 7.0,
) -> GenieScheduler:
    """A GENIE scheduler for ``pipeline`` (a diffusers pipeline with a ``unet`` and a ``scheduler``).

    Assign it to ``pipeline.scheduler``. Its sigmas span the model's training range
    (read from the pipeline's current scheduler, with its ``prediction_type``) on
    a Karras schedule with ``rho``. ``curvature`` defaults to ``"auto"`` (JVP, with
    finite differences where forward mode is missing), or ``"head"`` when a
    ``head`` (a file from ``diffsplit genie distill`` or a loaded head) is given.
    """
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise GenieSchedulerError(f"{type(pipeline).__name__} has no UNet: genie() needs a UNet pipeline")
    current = getattr(pipeline, "scheduler", None)
    alphas_cumprod = getattr(current, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise GenieSchedulerError(f"the pipeline's scheduler ({type(current).__name__}) has no "
                                  "alphas_cumprod to read the model's noise levels from")
    if isinstance(current, GenieScheduler):
        config, prediction_type = current.config, current.prediction_type
    else:
        config = getattr(current, "config", None)
        prediction_type = str(getattr(config, "prediction_type", "epsilon"))
    loaded = _head(head)
    scheduler = GenieScheduler(
        unet, alphas_cumprod, prediction_type=prediction_type,
        curvature=curvature or ("head" if loaded is not None else "auto"), head=loaded, rho=rho,
        config=config,
    )
    if isinstance(current, GenieScheduler):
        current.detach()  # one scheduler watches the UNet at a time
    return scheduler


def _head(head: str | Path | torch.nn.Module | None) -> torch.nn.Module | None:
    if head is None or isinstance(head, torch.nn.Module):
        return head
    if not isinstance(head, str | Path):
        raise GenieSchedulerError(f"head must be a path or a torch module, got {type(head).__name__}")
    from diffsplit.engine.models.genie_head import load_genie_head

    path = Path(head)
    if not path.is_file():
        raise GenieSchedulerError(f"no GENIE head file at {path}")
    return load_genie_head(path)
