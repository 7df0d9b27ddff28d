"""diffsplit.samplers.genie with the UNet offloaded: finite-difference curvature, split == local exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

import diffsplit
from diffsplit.samplers import GenieSchedulerError


def _latents(pipe: StableDiffusionPipeline) -> torch.Tensor:
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    return pipe("a red door", num_inference_steps=3, latents=noise, guidance_scale=4.0, height=64, width=64,
                output_type="latent").images


def test_offloaded_unet_takes_the_same_genie_steps_as_local(models_dir: Path, worker_address: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    local_scheduler = diffsplit.samplers.genie(pipe, curvature="finite_difference")
    pipe.scheduler = local_scheduler
    local = _latents(pipe)
    with diffsplit.offload(pipe, "unet", to=worker_address):
        with pytest.raises(GenieSchedulerError, match="do not cross the wire"):
            diffsplit.samplers.genie(pipe, curvature="jvp")
        pipe.scheduler = diffsplit.samplers.genie(pipe)  # auto: finite differences, and says why
        split = _latents(pipe)
        assert pipe.scheduler.fallback_reason is not None and "worker" in pipe.scheduler.fallback_reason
        assert pipe.scheduler.nfe == local_scheduler.nfe == 2 * 3 + 1
    pipe.scheduler.detach()
    assert torch.equal(local, split)
