"""The worker builds only the part of a checkpoint a recipe selects, and caches each part on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.rebuild import build_key
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import ModelCache, module_bytes
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.recipe import Recipe


def recipe_of_output(models_dir: Path, node_id: str, index: int) -> dict:
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(), registry)
    recipe = output_recipe_source(workflow, registry, ModelStore(models_dir))(node_id, index)
    assert recipe is not None
    return recipe


@pytest.fixture
def builder_and_cache(models_dir: Path) -> tuple[ModelBuilder, ModelCache]:
    cache = ModelCache(budget_bytes=1 << 30)
    return ModelBuilder(ModelStore(models_dir), default_registry(), cache), cache


def test_a_checkpoints_model_is_built_without_its_clip_and_vae(
    builder_and_cache: tuple[ModelBuilder, ModelCache], models_dir: Path
) -> None:
    builder, cache = builder_and_cache
    model = builder.build(recipe_of_output(models_dir, "1", 0))
    whole = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    assert fingerprint(model) == fingerprint(whole.model)
    (entry,) = cache.models()
    assert entry.bytes == module_bytes(whole.model) < module_bytes(whole)


def test_each_part_of_one_checkpoint_is_its_own_cache_entry_and_status_key(
    builder_and_cache: tuple[ModelBuilder, ModelCache], models_dir: Path
) -> None:
    builder, cache = builder_and_cache
    registry = default_registry()
    recipes = [recipe_of_output(models_dir, "1", index) for index in range(3)]
    built = [builder.build(recipe) for recipe in recipes]
    keys = [build_key(Recipe.from_dict(recipe), registry) for recipe in recipes]
    digest = Recipe.from_dict(recipes[0]).build_digest()
    assert keys == [f"{digest}:0", f"{digest}:1", f"{digest}:2"]
    assert sorted(cache.digests()) == sorted(keys)
    whole = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    assert sum(entry.bytes for entry in cache.models()) == module_bytes(whole)
    assert [fingerprint(value) for value in built] == [fingerprint(whole.model), fingerprint(whole.clip),
                                                        fingerprint(whole.vae)]
    assert builder.build(recipes[1]) is built[1]
    assert cache.stats().misses == 3


def test_a_loras_clip_does_not_build_the_base_model(
    builder_and_cache: tuple[ModelBuilder, ModelCache], models_dir: Path
) -> None:
    builder, cache = builder_and_cache
    registry = default_registry()
    lora_clip = recipe_of_output(models_dir, "2", 1)
    builder.build(lora_clip)
    base_model, base_clip = (Recipe.from_dict(recipe_of_output(models_dir, "1", index)) for index in (0, 1))
    assert build_key(base_clip, registry) in cache.digests()
    assert build_key(base_model, registry) not in cache.digests()
    assert len(cache.digests()) == 2  # the LoRA'd CLIP and the base CLIP, no UNet anywhere


def test_a_lora_part_equals_that_output_of_the_whole_node(
    builder_and_cache: tuple[ModelBuilder, ModelCache], models_dir: Path, tmp_path: Path
) -> None:
    from diffsplit.engine.executor import Executor

    builder, _ = builder_and_cache
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(), registry)
    executor = Executor(registry, ModelStore(models_dir), output_dir=tmp_path)
    outputs = executor.run(workflow, targets=["2"]).outputs["2"]
    for index in (0, 1):
        part = builder.build(recipe_of_output(models_dir, "2", index))
        assert fingerprint(part) == fingerprint(outputs[index])


def test_a_build_larger_than_the_whole_cache_is_warned_about_once(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ModelCache(budget_bytes=1024)
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), cache)
    recipe = recipe_of_output(models_dir, "1", 0)
    with caplog.at_level("WARNING", logger="diffsplit.remote.cache"):
        first = builder.build(recipe)
        second = builder.build(recipe)
    assert first is not second  # not kept: built again
    messages = [record.getMessage() for record in caplog.records]
    warnings = [message for message in messages if "larger than the whole" in message]
    assert len(warnings) == 1
    assert "CheckpointLoaderSimple(" in warnings[0] and "--cache-gb" in warnings[0]
    assert cache.stats().too_large == 1 and cache.stats().entries == 0
