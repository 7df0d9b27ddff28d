"""diffsplit.samplers.genie on real diffusers pipelines: the same steps as the engine's GENIE, honest NFE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.models.genie_head import GenieHead, GenieHeadConfig, load_genie_head
from diffsplit.engine.sampling.genie import Curvature, HeadCurvature, run_genie
from diffsplit.engine.sampling.schedules import continuous_timestep
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

import diffsplit
from diffsplit.samplers import GenieScheduler, GenieSchedulerError

PROMPT = "a lighthouse at dusk"
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def pipe(models_dir: Path) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def original_scheduler(pipe: StableDiffusionPipeline):
    scheduler = pipe.scheduler
    yield scheduler
    if isinstance(pipe.scheduler, GenieScheduler):
        pipe.scheduler.detach()
    pipe.scheduler = scheduler


def _noise(pipe: StableDiffusionPipeline) -> torch.Tensor:
    return torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(4))


def _latents(pipe: StableDiffusionPipeline, steps: int, noise: torch.Tensor, **options) -> torch.Tensor:
    options.setdefault("guidance_scale", GUIDANCE)
    return pipe(PROMPT, num_inference_steps=steps, latents=noise.clone(), height=64, width=64,
                output_type="latent", **options).images


def _guided_denoiser(pipe: StableDiffusionPipeline, scheduler: GenieScheduler):
    """The guided denoiser written out by hand: what the scheduler must have inferred from the pipeline."""
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    context = torch.cat([negative, positive])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scaled = x / (sigma**2 + 1) ** 0.5
        timestep = continuous_timestep(scheduler.log_sigmas, sigma)
        batch = torch.cat([scaled] * 2)
        output = pipe.unet(batch, timestep, encoder_hidden_states=context, return_dict=False)[0]
        uncond, cond = output.chunk(2)
        return x - sigma * (uncond + GUIDANCE * (cond - uncond))

    return denoise


def test_exact_genie_in_the_pipeline_equals_the_engines_genie_on_the_same_denoiser(
    pipe: StableDiffusionPipeline, original_scheduler, one_torch_thread: None
) -> None:
    scheduler = diffsplit.samplers.genie(pipe)
    pipe.scheduler = scheduler
    noise = _noise(pipe)
    with torch.no_grad():
        split = _latents(pipe, 5, noise)
        expected = run_genie(Curvature(_guided_denoiser(pipe, scheduler), method="jvp"),
                             noise * scheduler.sigmas[0], scheduler.sigmas)
    torch.testing.assert_close(split, expected, rtol=1e-4, atol=1e-4)
    assert scheduler.nfe == 4 * 3 + 1, "4 GENIE steps (1 + a JVP worth 2) and DDIM's last step"
    assert scheduler.fallback_reason is None
    with torch.no_grad():
        euler = run_genie(HeadCurvature(_guided_denoiser(pipe, scheduler), head=GenieHead(GenieHeadConfig())),
                          noise * scheduler.sigmas[0], scheduler.sigmas)
    assert float((split - euler).abs().max()) > 1e-2, "the curvature term changed the steps"


def test_finite_difference_curvature_is_the_engines_too(
    pipe: StableDiffusionPipeline, original_scheduler, one_torch_thread: None
) -> None:
    scheduler = diffsplit.samplers.genie(pipe, curvature="finite_difference")
    pipe.scheduler = scheduler
    noise = _noise(pipe)
    with torch.no_grad():
        split = _latents(pipe, 3, noise)
        expected = run_genie(Curvature(_guided_denoiser(pipe, scheduler), method="finite_difference"),
                             noise * scheduler.sigmas[0], scheduler.sigmas)
    torch.testing.assert_close(split, expected, rtol=1e-4, atol=1e-4)
    assert scheduler.nfe == 2 * 3 + 1
    replay = scheduler._replay
    assert replay is not None and replay.guidance == GUIDANCE, "the pipeline's own scale, not a fit of it"


def test_an_untrained_head_gives_diffusers_own_karras_euler_steps(
    pipe: StableDiffusionPipeline, original_scheduler
) -> None:
    euler = EulerDiscreteScheduler.from_config(original_scheduler.config, use_karras_sigmas=True,
                                               timestep_spacing="linspace")
    noise = _noise(pipe)
    pipe.scheduler = euler
    expected = _latents(pipe, 6, noise)
    pipe.scheduler = original_scheduler
    scheduler = diffsplit.samplers.genie(pipe, head=GenieHead(GenieHeadConfig()))  # its last layer is zero
    pipe.scheduler = scheduler
    torch.testing.assert_close(_latents(pipe, 6, noise), expected, rtol=1e-4, atol=1e-3)
    assert scheduler.nfe == 6, "a head costs no denoiser evaluation"


def test_a_head_file_steps_like_the_engines_head_sampler(
    pipe: StableDiffusionPipeline, models_dir: Path, original_scheduler, one_torch_thread: None
) -> None:
    path = models_dir / "genie_heads" / "tiny-sd15-genie.safetensors"
    scheduler = diffsplit.samplers.genie(pipe, head=path)
    assert scheduler.curvature == "head"
    pipe.scheduler = scheduler
    noise = _noise(pipe)
    with torch.no_grad():
        split = _latents(pipe, 4, noise)
        expected = run_genie(HeadCurvature(_guided_denoiser(pipe, scheduler), head=load_genie_head(path)),
                             noise * scheduler.sigmas[0], scheduler.sigmas)
    torch.testing.assert_close(split, expected, rtol=1e-4, atol=1e-4)


def test_custom_sigmas_from_the_pipeline(pipe: StableDiffusionPipeline, original_scheduler) -> None:
    scheduler = diffsplit.samplers.genie(pipe)
    pipe.scheduler = scheduler
    sigmas = [10.0, 3.0, 1.0, 0.3, 0.0]
    pipe(PROMPT, sigmas=sigmas, height=64, width=64, output_type="latent", guidance_scale=GUIDANCE)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(sigmas))
    assert scheduler.num_inference_steps == 4 and scheduler.nfe == 3 * 3 + 1
    assert float(scheduler.timesteps[0]) == pytest.approx(
        float(continuous_timestep(scheduler.log_sigmas, torch.tensor(10.0))))


def test_image_to_image_starts_part_way(pipe: StableDiffusionPipeline, original_scheduler) -> None:
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffsplit.samplers.genie(img2img)
    try:
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        result = img2img(PROMPT, image=image, strength=0.5, num_inference_steps=8, guidance_scale=GUIDANCE,
                         output_type="latent", generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(result).all()
        assert img2img.scheduler.begin_index == 4
        assert img2img.scheduler.nfe == 3 * 3 + 1, "the last 4 of 8 steps ran"
    finally:
        img2img.scheduler.detach()


def test_guidance_rescale_is_refused_by_name(pipe: StableDiffusionPipeline, original_scheduler) -> None:
    pipe.scheduler = diffsplit.samplers.genie(pipe)
    with pytest.raises(GenieSchedulerError, match="guidance_rescale"):
        _latents(pipe, 3, _noise(pipe), guidance_rescale=0.7)
    pipe.scheduler = diffsplit.samplers.genie(pipe, head=GenieHead(GenieHeadConfig()))
    rescaled = _latents(pipe, 3, _noise(pipe), guidance_rescale=0.7)
    assert torch.isfinite(rescaled).all(), "a head needs no replay"


def test_no_guidance_replays_the_single_call(pipe: StableDiffusionPipeline, original_scheduler) -> None:
    scheduler = diffsplit.samplers.genie(pipe)
    pipe.scheduler = scheduler
    latents = _latents(pipe, 3, _noise(pipe), guidance_scale=1.0)  # one UNet row per latent: no CFG
    assert torch.isfinite(latents).all() and scheduler.nfe == 2 * 3 + 1


def test_a_unet_input_changed_after_scaling_is_refused(
    pipe: StableDiffusionPipeline, original_scheduler
) -> None:
    scheduler = diffsplit.samplers.genie(pipe)
    pipe.scheduler = scheduler
    scaled = scheduler.scale_model_input  # the pipeline then changes the scaled latents before the UNet
    scheduler.scale_model_input = lambda sample, t=None: scaled(sample, t) * 1.0  # type: ignore[method-assign]
    with pytest.raises(GenieSchedulerError, match="scaled latents"):
        _latents(pipe, 2, _noise(pipe))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"curvature": "second"}, "curvature must be one of"),
     ({"rho": 0}, "rho must be"),
     ({"head": "no/such/head.safetensors"}, "no GENIE head file"),
     ({"head": 3}, "head must be a path"),
     ({"curvature": "jvp", "head": GenieHead(GenieHeadConfig())}, "exactly when")],
)
def test_bad_options_are_named(pipe: StableDiffusionPipeline, options: dict, message: str) -> None:
    with pytest.raises(GenieSchedulerError, match=message):
        diffsplit.samplers.genie(pipe, **options).detach()


def test_bad_schedules_and_misuse_are_named(pipe: StableDiffusionPipeline, original_scheduler) -> None:
    detached = diffsplit.samplers.genie(pipe)
    detached.detach()
    pipe.scheduler = detached
    with pytest.raises(GenieSchedulerError, match="detached"):
        _latents(pipe, 2, _noise(pipe))
    scheduler = diffsplit.samplers.genie(pipe)
    try:
        with pytest.raises(GenieSchedulerError, match="set_timesteps before step"):
            scheduler.step(torch.zeros(1, 4, 8, 8), 999.0, torch.zeros(1, 4, 8, 8))
        for bad in (0, 2.5, True):
            with pytest.raises(GenieSchedulerError, match="num_inference_steps must be an int"):
                scheduler.set_timesteps(bad)
        with pytest.raises(GenieSchedulerError, match="exactly one"):
            scheduler.set_timesteps(4, sigmas=[1.0, 0.0])
        for sigmas, message in (([1.0, 2.0, 0.0], "strictly decreasing"), ([1.0], "at least two"),
                                ([1.0, -1.0], "positive"), ([float("nan"), 0.0], "finite"),
                                (["a", 0.0], "list of numbers")):
            with pytest.raises(GenieSchedulerError, match=message):
                scheduler.set_timesteps(sigmas=sigmas)
        scheduler.set_timesteps(2)
        with pytest.raises(GenieSchedulerError, match="not one of this schedule's"):
            scheduler.scale_model_input(torch.zeros(1, 4, 8, 8), 12.5)
    finally:
        scheduler.detach()


def test_a_pipeline_without_a_unet_or_noise_table_is_refused() -> None:
    with pytest.raises(GenieSchedulerError, match="has no UNet"):
        diffsplit.samplers.genie(object())

    class NoTable:
        unet = torch.nn.Linear(1, 1)
        scheduler = object()

    with pytest.raises(GenieSchedulerError, match="no alphas_cumprod"):
        diffsplit.samplers.genie(NoTable())


def test_sdxl_added_conditions_are_replayed(models_dir: Path, one_torch_thread: None) -> None:
    from diffusers import StableDiffusionXLPipeline

    xl = StableDiffusionXLPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sdxl")
    xl.set_progress_bar_config(disable=True)
    scheduler = diffsplit.samplers.genie(xl)
    xl.scheduler = scheduler
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    exact = xl(PROMPT, num_inference_steps=3, latents=noise.clone(), height=64, width=64,
               guidance_scale=GUIDANCE, output_type="latent").images
    assert scheduler.nfe == 2 * 3 + 1 and scheduler.fallback_reason is None
    call = scheduler._replay.call if scheduler._replay is not None else None
    assert call is not None and "added_cond_kwargs" in call.kwargs, "SDXL's text_embeds and time_ids go along"
    xl.scheduler = diffsplit.samplers.genie(xl, head=GenieHead(GenieHeadConfig()))
    euler = xl(PROMPT, num_inference_steps=3, latents=noise.clone(), height=64, width=64,
               guidance_scale=GUIDANCE, output_type="latent").images
    xl.scheduler.detach()
    assert torch.isfinite(exact).all() and float((exact - euler).abs().max()) > 1e-2
