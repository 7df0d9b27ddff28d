"""A worker builds only the pipeline component a recipe selects, from its subfolder, as the pipeline does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.rebuild import build_key, pipeline_component
from diffsplit.engine.store import ModelStore
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import ModelCache, module_bytes
from diffsplit.tracer.recipe import Recipe

import diffsplit

COMPONENTS = ("unet", "text_encoder", "vae", "scheduler", "tokenizer")


@pytest.fixture(scope="module")
def traced(models_dir: Path) -> tuple[Any, Any]:
    from diffusers import StableDiffusionPipeline

    with diffsplit.tracing(store=ModelStore(models_dir)) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    return trace, pipe


@pytest.mark.parametrize("name", COMPONENTS)
def test_each_component_is_built_alone_and_passes_the_clients_fingerprint(
    traced: tuple[Any, Any], models_dir: Path, name: str
) -> None:
    trace, pipe = traced
    recipe = trace.recipe(getattr(pipe, name))
    assert pipeline_component(recipe) == name
    cache = ModelCache(1 << 30)
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), cache)
    built = builder.build(recipe.to_dict())  # the recipe's fingerprint is checked
    assert type(built) is type(getattr(pipe, name))
    (entry,) = cache.models()
    assert entry.digest == f"{recipe.build_digest()}:{name}" == build_key(recipe, default_registry())
    assert entry.bytes == module_bytes(getattr(pipe, name)) <= module_bytes(pipe)


def test_an_offloaded_unet_costs_the_worker_the_unet_only(traced: tuple[Any, Any], models_dir: Path) -> None:
    trace, pipe = traced
    cache = ModelCache(1 << 30)
    ModelBuilder(ModelStore(models_dir), default_registry(), cache).build(trace.recipe(pipe.unet).to_dict())
    assert sum(model.bytes for model in cache.models()) == module_bytes(pipe.unet) < module_bytes(pipe)


def test_only_a_named_library_class_with_its_subfolder_is_built_alone(tmp_path: Path) -> None:
    import json

    from diffsplit.tracer.pipeline_folders import component_class

    (tmp_path / "unet").mkdir()
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "odd": ["os", "system"], "text_encoder": "CLIPTextModel"}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert component_class(tmp_path, "unet") == ("diffusers", "UNet2DConditionModel")
    for name in ("vae", "safety_checker", "odd", "text_encoder", "missing"):  # no subfolder, or no class
        assert component_class(tmp_path, name) == (None, None), name
    (tmp_path / "model_index.json").write_text("{not json")
    assert component_class(tmp_path, "unet") == (None, None)


def test_a_recipe_with_steps_after_the_load_builds_the_pipeline(traced: tuple[Any, Any]) -> None:
    trace, pipe = traced
    recipe = trace.recipe(pipe.unet)
    steps = (*recipe.steps, recipe.steps[0])
    assert pipeline_component(Recipe(steps=steps, select="unet")) is None
    assert pipeline_component(Recipe(steps=recipe.steps, select="")) is None
