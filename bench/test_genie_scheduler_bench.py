"""``diffsplit.samplers.genie`` in a diffusers pipeline against diffusers' own Karras Euler.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider bench/test_genie_scheduler_bench.py -s``.
The reference is diffusers' Euler (Karras sigmas over the training range) with 1,000 steps: the same
ODE in the same continuous timesteps. Random weights: this measures ODE accuracy, not image quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

import diffsplit

PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def pipe(models_dir: Path) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _run(pipe: StableDiffusionPipeline, scheduler: object, steps: int) -> tuple[torch.Tensor, float]:
    pipe.scheduler = scheduler
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    started = time.perf_counter()
    latents = pipe(PROMPT, num_inference_steps=steps, latents=noise, guidance_scale=5.0, height=128,
                   width=128, output_type="latent").images
    return latents, time.perf_counter() - started


@pytest.mark.timeout(1800)
def test_genie_scheduler_against_karras_euler(pipe: StableDiffusionPipeline, benchmark) -> None:
    torch.set_num_threads(1)
    original = pipe.scheduler
    euler = EulerDiscreteScheduler.from_config(original.config, use_karras_sigmas=True,
                                               timestep_spacing="linspace")
    reference, reference_s = _run(pipe, euler, 1000)
    print(f"\ntiny SD 1.5 pipeline (random weights), CFG 5, 16x16 latent; reference: Karras Euler, "
          f"1000 steps ({reference_s:.1f} s)")
    print(f"{'steps':>5} {'sampler':>16} {'NFE':>4} {'max abs err':>12} {'wall s':>7}")
    for steps in (4, 8, 16, 32):
        rows = [("euler", euler, steps), ("euler 2N", euler, 2 * steps)]
        for method in ("jvp", "finite_difference"):
            pipe.scheduler = original
            rows.append((f"genie {method}", diffsplit.samplers.genie(pipe, curvature=method), steps))
        for name, scheduler, count in rows:
            latents, wall = _run(pipe, scheduler, count)
            nfe = scheduler.nfe if hasattr(scheduler, "nfe") else count
            error = float((latents - reference).abs().max())
            print(f"{steps:5d} {name:>16} {nfe:4d} {error:12.4e} {wall:7.3f}")
            if hasattr(scheduler, "detach"):
                scheduler.detach()
    pipe.scheduler = original
    genie = diffsplit.samplers.genie(pipe)

    def one_genie_run() -> None:
        _run(pipe, genie, 8)

    benchmark.pedantic(one_genie_run, rounds=3, iterations=1)
    euler_s = min(_run(pipe, euler, 8)[1] for _ in range(3))
    ratio = benchmark.stats.stats.min / euler_s
    benchmark.extra_info["genie_over_euler_wall_at_8_steps"] = ratio
    print(f"GENIE (JVP) / Euler wall time at 8 steps, whole pipeline call: {ratio:.2f}x")
    genie.detach()
    pipe.scheduler = original
