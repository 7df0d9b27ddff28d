"""Tracer benchmarks: overhead of a traced run against the same run untraced, in the same process,
and recipe sizes per model input.

Overheads are ratios of the fastest of several interleaved rounds (traced / untraced), with one
torch thread so the two variants compete for the same core. ``noop_profile_ratio`` is the same
run under a ``sys.setprofile`` function that does nothing: the floor for a profiler that watches
every call (CPython 3.11 materializes each frame's locals for every event). The tracer pays about
that floor while loading (the tiny models make loading almost pure Python) and stays below it in
sampler loops, where it switches itself off inside module forwards. Every figure goes to
``benchmark.extra_info`` (see ``--benchmark-json``) and is printed. Nothing here asserts a timing.

    .venv/bin/python -m pytest bench/test_tracer_bench.py -q -s --benchmark-columns=min,median
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.tiny import write_tiny_models
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import trace_workflow
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

STEPS = 20
ROUNDS = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model set (benchmarks do not share the tests' conftest)."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (``one_torch_thread``)."""


def interleaved_best(
    untraced: Callable[[], Any], traced: Callable[[], Any], rounds: int = ROUNDS
) -> tuple[float, float]:
    """The fastest untraced and traced times over ``rounds`` alternating rounds (after one warm-up each)."""
    untraced()
    traced()
    best = [float("inf"), float("inf")]
    for round_number in range(rounds):
        order = (0, 1) if round_number % 2 == 0 else (1, 0)
        for which in order:
            started = time.perf_counter()
            (untraced, traced)[which]()
            best[which] = min(best[which], time.perf_counter() - started)
    return best[0], best[1]


def report(benchmark: Any, capsys: Any, name: str, **figures: object) -> None:
    benchmark.extra_info.update(figures)
    with capsys.disabled():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        print(f"\n[{name}] {shown}")


def generate(pipe: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a cat", num_inference_steps=STEPS, height=64, width=64, generator=generator, output_type="pt"
    ).images


def load_sd15(models: Path) -> Any:
    pipe = StableDiffusionPipeline.from_pretrained(str(models / "diffusers" / "tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noop_profile(frame: Any, event: str, arg: Any) -> None:
    """The cheapest possible profile function: the floor any sys.setprofile tracer pays."""


def under_noop_profile(function: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        previous = sys.getprofile()
        sys.setprofile(noop_profile)
        try:
            return function()
        finally:
            sys.setprofile(previous)

    return run


def traced(function: Callable[[], Any], **options: Any) -> Callable[[], Any]:
    def run() -> Any:
        with tracing(**options):
            return function()

    return run


def test_full_run_overhead(benchmark: Any, capsys: Any, models: Path) -> None:
    """from_pretrained + load_lora_weights + set_adapters + 20 steps, traced vs untraced."""

    def full_run() -> torch.Tensor:
        pipe = load_sd15(models)
        pipe.load_lora_weights(str(models / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
        return generate(pipe)

    base, with_tracer = interleaved_best(full_run, traced(full_run))
    _, floor = interleaved_best(full_run, under_noop_profile(full_run), rounds=3)
    benchmark.pedantic(traced(full_run), rounds=2, iterations=1)
    report(
        benchmark,
        capsys,
        "full run",
        untraced_s=base,
        traced_s=with_tracer,
        ratio=with_tracer / base,
        noop_profile_ratio=floor / base,
    )


def test_sampler_loop_overhead(benchmark: Any, capsys: Any, models: Path) -> None:
    """20 denoising steps of a loaded pipeline; also without pausing inside module forwards."""
    pipe = load_sd15(models)

    def loop() -> torch.Tensor:
        return generate(pipe)

    base, with_tracer = interleaved_best(loop, traced(loop))
    _, unpaused = interleaved_best(loop, traced(loop, pause_in_module_calls=False), rounds=3)
    benchmark.pedantic(traced(loop), rounds=3, iterations=1)
    report(
        benchmark,
        capsys,
        "sampler loop",
        untraced_s=base,
        traced_s=with_tracer,
        ratio=with_tracer / base,
        ratio_without_pausing=unpaused / base,
    )


def test_from_pretrained_overhead(benchmark: Any, capsys: Any, models: Path) -> None:
    """StableDiffusionPipeline.from_pretrained alone."""

    def load() -> Any:
        return load_sd15(models)

    base, with_tracer = interleaved_best(load, traced(load), rounds=7)
    _, floor = interleaved_best(load, under_noop_profile(load), rounds=5)
    benchmark.pedantic(traced(load), rounds=3, iterations=1)
    report(
        benchmark,
        capsys,
        "from_pretrained",
        untraced_s=base,
        traced_s=with_tracer,
        ratio=with_tracer / base,
        noop_profile_ratio=floor / base,
    )


def _sizes(recipes: dict[str, Any]) -> dict[str, int]:
    return {name: recipe.size_bytes() for name, recipe in recipes.items()}


def test_recipe_sizes_sd15_lora(benchmark: Any, capsys: Any, models: Path) -> None:
    """Bytes per model input: the diffusers pipeline with a LoRA, and the ComfyUI demo graph."""
    store = ModelStore(models)
    with tracing(store=store) as recorded:
        pipe = load_sd15(models)
        pipe.load_lora_weights(str(models / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
    parts = ("unet", "text_encoder", "vae", "scheduler", "tokenizer")
    sizes = {f"pipe.{part}": recorded.recipe(getattr(pipe, part)).size_bytes() for part in parts}
    demo = Path(__file__).parent.parent / "diffsplit" / "workflows" / "demo_sd15.json"
    graph = benchmark.pedantic(
        lambda: trace_workflow(demo, default_registry(), store, execute=False), rounds=3, iterations=1
    )
    sizes.update({f"graph.{key}": size for key, size in _sizes(graph.recipes()).items()})
    report(benchmark, capsys, "recipe bytes, SD 1.5 + LoRA", max_bytes=max(sizes.values()), **sizes)


def _sdxl_graph() -> dict[str, Any]:
    def node(class_type: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": class_type, "inputs": inputs}

    sampler = {"cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "steps": 4, "noise_seed": 1}
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="tiny-sdxl.safetensors"),
        "2": node("CheckpointLoaderSimple", ckpt_name="tiny-sdxl-refiner.safetensors"),
        "3": node(
            "CLIPTextEncodeSDXL",
            clip=["1", 1],
            width=64,
            height=64,
            crop_w=0,
            crop_h=0,
            target_width=64,
            target_height=64,
            text_g="a fox",
            text_l="a fox",
        ),
        "4": node(
            "CLIPTextEncodeSDXL",
            clip=["1", 1],
            width=64,
            height=64,
            crop_w=0,
            crop_h=0,
            target_width=64,
            target_height=64,
            text_g="",
            text_l="",
        ),
        "5": node("CLIPTextEncodeSDXLRefiner", clip=["2", 1], ascore=6.0, width=64, height=64, text="a fox"),
        "6": node("CLIPTextEncodeSDXLRefiner", clip=["2", 1], ascore=2.5, width=64, height=64, text=""),
        "7": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "8": node(
            "KSamplerAdvanced",
            model=["1", 0],
            add_noise="enable",
            positive=["3", 0],
            negative=["4", 0],
            latent_image=["7", 0],
            start_at_step=0,
            end_at_step=3,
            return_with_leftover_noise="enable",
            **sampler,
        ),
        "9": node(
            "KSamplerAdvanced",
            model=["2", 0],
            add_noise="disable",
            positive=["5", 0],
            negative=["6", 0],
            latent_image=["8", 0],
            start_at_step=3,
            end_at_step=4,
            return_with_leftover_noise="disable",
            **sampler,
        ),
        "10": node("VAEDecode", samples=["9", 0], vae=["2", 2]),
        "11": node("PreviewImage", images=["10", 0]),
    }


def test_recipe_sizes_sdxl_base_and_refiner(benchmark: Any, capsys: Any, models: Path) -> None:
    """Bytes per model input: SDXL base (diffusers) and a base + refiner graph (executed once)."""
    store = ModelStore(models)
    with tracing(store=store) as recorded:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(models / "diffusers" / "tiny-sdxl"))
    parts = ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer_2")
    sizes = {f"pipe.{part}": recorded.recipe(getattr(pipe, part)).size_bytes() for part in parts}
    graph = benchmark.pedantic(
        lambda: trace_workflow(_sdxl_graph(), default_registry(), store), rounds=1, iterations=1
    )
    sizes.update({f"graph.{key}": size for key, size in _sizes(graph.recipes()).items()})
    report(benchmark, capsys, "recipe bytes, SDXL base + refiner", max_bytes=max(sizes.values()), **sizes)
