"""The decorator API: @workflow traces a run, @node explains its inputs, @loader records a user loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline

from diffsplit.decorators import LoaderFunction, NodeFunction, loader, node, workflow


@loader
def load_pipeline(folder: str) -> StableDiffusionPipeline:
    """Load a pipeline (a user's own loader)."""
    return StableDiffusionPipeline.from_pretrained(folder)


@node(remote="tcp://gpu:5555")
def denoise(pipe: Any, latents: torch.Tensor, steps: int, callback: Any = None) -> torch.Tensor:
    """A step that only runs the UNet of the pipeline it is given."""
    context = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
    for t in range(steps):
        latents = latents - 0.1 * pipe.unet(latents, t, context).sample
    return latents


@workflow
def generate(folder: str, seed: int) -> torch.Tensor:
    """Load, then denoise a seeded latent."""
    pipe = load_pipeline(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return denoise(pipe, latents, 2)


def test_wrappers_keep_names_and_the_remote_address() -> None:
    assert isinstance(denoise, NodeFunction) and denoise.remote == "tcp://gpu:5555"
    assert denoise.__name__ == "denoise" and "only runs the UNet" in denoise.__doc__
    assert isinstance(load_pipeline, LoaderFunction)
    assert load_pipeline.import_name.endswith(":load_pipeline")
    assert node(lambda x: x).remote is None
    with pytest.raises(TypeError, match="address"):
        node(remote=5555)(lambda x: x)


def test_plain_calls_just_run() -> None:
    @node
    def double(x: int) -> int:
        return 2 * x

    class Holder:
        @node
        def triple(self, x: int) -> int:
            return 3 * x

    assert double(4) == 8
    assert Holder().triple(2) == 6


def test_workflow_trace_explains_node_inputs(models_dir: Path) -> None:
    folder = str(models_dir / "diffusers" / "tiny-sd15")
    recorded = generate.trace(folder, seed=3)
    assert recorded.result.shape == (1, 4, 8, 8)
    (step,) = recorded.steps
    assert step.name == "denoise" and step.remote == "tcp://gpu:5555" and not step.raised
    pipe_input, latents, steps = step.inputs
    assert (pipe_input.category, latents.category, steps.category) == ("model", "intermediate", "normal")
    assert pipe_input.model.recipe.steps[0].op == "user.loader"
    assert pipe_input.used == ("unet",)
    assert pipe_input.parts["unet"].select == "unet"
    assert "denoise.pipe ← load_pipeline(tiny-sd15 sha256:" in recorded.report()


def test_uncategorized_and_unexplained_inputs_are_reported_not_raised() -> None:
    with tracing() as recorded:
        pipe_like = torch.nn.Conv2d(4, 4, 1)
        with pytest.raises(AttributeError):
            denoise(pipe_like, torch.zeros(1, 4, 8, 8), 1, callback=lambda: None)
    (step,) = recorded.steps
    assert step.raised
    by_name = {item.name: item for item in step.inputs}
    assert "no known loader" in by_name["pipe"].model.refusal.reason
    assert not by_name["pipe"].offloadable
    assert "input 'callback' is a function" in by_name["callback"].error


def test_a_loader_returning_an_already_traced_object_keeps_its_history(models_dir: Path) -> None:
    cache: dict[str, Any] = {}

    @loader
    def cached_pipeline(folder: str) -> StableDiffusionPipeline:
        if folder not in cache:
            cache[folder] = StableDiffusionPipeline.from_pretrained(folder)
        return cache[folder]

    folder = str(models_dir / "diffusers" / "tiny-sd15")
    with tracing() as recorded:
        cached_pipeline(folder).text_encoder.to(torch.float64)
        pipe = cached_pipeline(folder)
    steps = recorded.recipe(pipe.text_encoder).steps
    assert [step.op for step in steps] == ["user.loader", "torch.to"]


def test_nested_traces_both_record_the_inner_calls(models_dir: Path) -> None:
    folder = str(models_dir / "diffusers" / "tiny-sd15")
    with tracing() as outer:
        with tracing() as inner:
            pipe = StableDiffusionPipeline.from_pretrained(folder)
        pipe.unet.to(torch.float64)
    assert [call.op for call in inner.calls] == ["diffusers.from_pretrained"]
    assert [call.op for call in outer.calls] == ["diffusers.from_pretrained", "torch.to"]
    assert inner.recipe(pipe.unet).steps[0].op == outer.recipe(pipe.unet).steps[0].op
