"""KSampler and KSamplerAdvanced on the tiny SD 1.5 / SDXL checkpoints of the models folder."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.sampling import KSAMPLER, KSAMPLER_ADVANCED, NODES
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES
from diffsplit.engine.sampling.schedules import SCHEDULER_NAMES, DiscreteSchedule, sigmas
from diffsplit.engine.types import DiffusionModel


@dataclass
class ProgressContext:
    """The part of a NodeContext that samplers use: progress reports, recorded."""

    node_id: str = "3"
    reports: list[tuple[int, int]] = field(default_factory=list)

    def progress(self, step: int, total: int) -> None:
        self.reports.append((step, total))


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def sd15(models_dir: Path) -> DiffusionModel:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model


def _conditioning(model: DiffusionModel, seed: int, **extras: Any) -> list[list[Any]]:
    config = model.unet.config
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    if model.family == "sd15":
        return [[cond, dict(extras)]]
    time_ids = 6 if model.family == "sdxl" else 5
    pooled_dim = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
    return [[cond, {"pooled_output": torch.randn(1, pooled_dim, generator=generator), **extras}]]


def _empty(batch: int = 1) -> dict[str, torch.Tensor]:
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def _ksampler(model: DiffusionModel, ctx: ProgressContext | None = None, **overrides: Any) -> torch.Tensor:
    inputs: dict[str, Any] = {
        "model": model,
        "seed": 7,
        "steps": 3,
        "cfg": 6.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": _conditioning(model, 1),
        "negative": _conditioning(model, 2),
        "latent_image": _empty(),
        "denoise": 1.0,
    }
    inputs.update(overrides)
    (latent,) = KSAMPLER.function(ctx or ProgressContext(), **inputs)
    return latent["samples"]


def _advanced(model: DiffusionModel, **overrides: Any) -> torch.Tensor:
    inputs: dict[str, Any] = {
        "model": model,
        "add_noise": "enable",
        "noise_seed": 7,
        "steps": 8,
        "cfg": 6.0,
        "sampler_name": "euler",
        "scheduler": "karras",
        "positive": _conditioning(model, 1),
        "negative": _conditioning(model, 2),
        "latent_image": _empty(),
        "start_at_step": 0,
        "end_at_step": 10000,
        "return_with_leftover_noise": "disable",
    }
    inputs.update(overrides)
    (latent,) = KSAMPLER_ADVANCED.function(ProgressContext(), **inputs)
    return latent["samples"]


def test_declarations_match_comfyui() -> None:
    assert [n.name for n in NODES] == ["KSampler", "KSamplerAdvanced"]
    assert [(s.name, s.type) for s in KSAMPLER.inputs] == [
        ("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
        ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
        ("latent_image", "LATENT"), ("denoise", "FLOAT"),
    ]  # fmt: skip
    assert [s.name for s in KSAMPLER_ADVANCED.inputs] == [
        "model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
        "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise",
    ]  # fmt: skip
    seed = KSAMPLER.input("seed")
    assert seed is not None and seed.control_after_generate and seed.max == 2**64 - 1 and seed.min == 0
    noise_seed = KSAMPLER_ADVANCED.input("noise_seed")
    assert noise_seed is not None and noise_seed.control_after_generate
    steps, cfg, denoise = KSAMPLER.input("steps"), KSAMPLER.input("cfg"), KSAMPLER.input("denoise")
    assert steps is not None and (steps.default, steps.min, steps.max) == (20, 1, 10000)
    assert cfg is not None and cfg.default == 8.0
    assert denoise is not None and (denoise.default, denoise.min, denoise.max) == (1.0, 0.0, 1.0)
    assert KSAMPLER.input("sampler_name").choices == SAMPLER_NAMES  # type: ignore[union-attr]
    assert KSAMPLER.input("scheduler").choices == SCHEDULER_NAMES  # type: ignore[union-attr]
    assert KSAMPLER_ADVANCED.input("add_noise").choices == ("enable", "disable")  # type: ignore[union-attr]
    leftover = KSAMPLER_ADVANCED.input("return_with_leftover_noise")
    assert leftover is not None and leftover.choices == ("disable", "enable")
    end = KSAMPLER_ADVANCED.input("end_at_step")
    assert end is not None and end.default == 10000
    assert [o.type for o in KSAMPLER.outputs] == ["LATENT"] == [o.type for o in KSAMPLER_ADVANCED.outputs]
    assert [s.name for s in KSAMPLER.widget_inputs] == [
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
    ]


def test_ksampler_is_deterministic_and_seeded(sd15: DiffusionModel) -> None:
    ctx = ProgressContext()
    first = _ksampler(sd15, ctx)
    assert torch.equal(first, _ksampler(sd15))
    assert not torch.allclose(first, _ksampler(sd15, seed=8))
    assert ctx.reports == [(1, 3), (2, 3), (3, 3)]
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()


@pytest.mark.parametrize(("sampler_name", "scheduler"), [("dpmpp_2m", "karras"), ("uni_pc", "sgm_uniform")])
def test_other_samplers_run_on_the_real_checkpoint(
    sd15: DiffusionModel, sampler_name: str, scheduler: str
) -> None:
    out = _ksampler(sd15, sampler_name=sampler_name, scheduler=scheduler, latent_image=_empty(2))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])


def test_partial_denoise_keeps_closer_to_the_input(sd15: DiffusionModel) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    full = _ksampler(sd15, latent_image={"samples": image}, steps=4)
    partial = _ksampler(sd15, latent_image={"samples": image}, steps=4, denoise=0.25)
    assert (partial - image).abs().mean() < (full - image).abs().mean()


def test_cfg_one_equals_an_explicit_euler_loop(sd15: DiffusionModel) -> None:
    positive = _conditioning(sd15, 1)
    sampled = _ksampler(sd15, cfg=1.0, positive=positive, steps=3)
    assert torch.equal(
        sampled, _ksampler(sd15, cfg=1.0, positive=positive, negative=_conditioning(sd15, 9), steps=3)
    )
    schedule = DiscreteSchedule(sd15.sampling)
    steps = sigmas(sd15.sampling, "normal", 3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x = noise * (1 + steps[0] ** 2) ** 0.5
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(steps):
            timestep = schedule.timestep(sigma).reshape(1)
            eps = sd15.unet(x / (sigma**2 + 1) ** 0.5, timestep, encoder_hidden_states=positive[0][0]).sample
            denoised = x - eps * sigma
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=1e-5)


def test_advanced_handoff_equals_one_run(sd15: DiffusionModel) -> None:
    one_run = _advanced(sd15)
    first = _advanced(sd15, end_at_step=4, return_with_leftover_noise="enable")
    second = _advanced(sd15, latent_image={"samples": first}, add_noise="disable", start_at_step=4)
    assert torch.equal(second, one_run)
    # Forcing the full denoise at step 4 gives a different, finished latent.
    finished = _advanced(sd15, end_at_step=4)
    assert not torch.allclose(finished, first)


def test_advanced_window_past_the_end_returns_the_input(sd15: DiffusionModel) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_advanced(sd15, latent_image={"samples": image}, start_at_step=8), image)


def test_advanced_without_noise_ignores_the_seed_for_euler(sd15: DiffusionModel) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 3
    one = _advanced(sd15, latent_image={"samples": image}, add_noise="disable", start_at_step=5, noise_seed=1)
    two = _advanced(sd15, latent_image={"samples": image}, add_noise="disable", start_at_step=5, noise_seed=2)
    assert torch.equal(one, two)


def test_noise_mask_keeps_the_unmasked_region_and_is_passed_on(sd15: DiffusionModel) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 24:48, 16:40] = 1.0
    latent = {"samples": image, "noise_mask": mask, "batch_index": [0]}
    (out,) = KSAMPLER.function(
        ProgressContext(), model=sd15, seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
        positive=_conditioning(sd15, 1), negative=_conditioning(sd15, 2), latent_image=latent, denoise=1.0,
    )  # fmt: skip
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[3:6, 2:5] = False
    torch.testing.assert_close(out["samples"][..., keep], image[..., keep], rtol=0, atol=1e-5)
    assert not torch.allclose(out["samples"][..., 3:6, 2:5], image[..., 3:6, 2:5], atol=1e-2)
    assert out["noise_mask"] is mask and out["batch_index"] == [0]
    assert latent["samples"] is image


def test_sdxl_base_to_refiner_handoff(models_dir: Path) -> None:
    base = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl.safetensors").model
    refiner = load_checkpoint(models_dir / "checkpoints" / "tiny-sdxl-refiner.safetensors").model
    size = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0}
    first = _advanced(
        base, steps=3, end_at_step=2, return_with_leftover_noise="enable",
        positive=_conditioning(base, 1, **size), negative=_conditioning(base, 2, **size),
    )  # fmt: skip
    refined = _advanced(
        refiner, steps=3, start_at_step=2, add_noise="disable", latent_image={"samples": first},
        positive=_conditioning(refiner, 3, aesthetic_score=6.0, **size),
        negative=_conditioning(refiner, 4, aesthetic_score=2.5, **size),
    )  # fmt: skip
    assert refined.shape == (1, 4, 8, 8) and torch.isfinite(refined).all()
    assert (refined.abs().mean() < first.abs().mean()).item()


def test_unknown_sampler_is_a_workflow_error(sd15: DiffusionModel) -> None:
    with pytest.raises(WorkflowError, match=r"sampler_name.*unknown sampler 'euler_a'"):
        _ksampler(sd15, sampler_name="euler_a")
    with pytest.raises(WorkflowError, match="scheduler"):
        _ksampler(sd15, scheduler="betta")
