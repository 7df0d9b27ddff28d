"""The worker's builder: recipes built through the LRU cache, a base shared by two LoRAs built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import ModelCache
from diffsplit.remote.errors import BadRequest, MissingModel
from diffsplit.tracer.fingerprint import fingerprint


def lora_recipe(models_dir: Path, strength: float) -> dict:
    registry = default_registry()
    document = sd15_workflow()
    document["2"]["inputs"]["strength_model"] = strength
    workflow = load_workflow(document, registry)
    return output_recipe_source(workflow, registry, ModelStore(models_dir))("2", 0)


def test_base_shared_by_two_lora_recipes_is_built_once_and_never_mutated(models_dir: Path) -> None:
    cache = ModelCache(budget_bytes=1 << 30)
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), cache)
    base_recipe = lora_recipe(models_dir, 0.8)["steps"][0]["kwargs"]["model"]["$recipe"]
    base = builder.build(base_recipe)
    base_print = fingerprint(base)
    strong = builder.build(lora_recipe(models_dir, 0.8))
    weak = builder.build(lora_recipe(models_dir, 0.3))
    assert strong is not weak and strong.unet is not base.unet
    assert fingerprint(base) == base_print, "applying a LoRA must not change the cached base"
    assert builder.build(base_recipe) is base
    stats = cache.stats()
    # checkpoint once; each LoRA once (their nested base recipe is a cache hit).
    assert stats.misses == 3
    assert stats.hits >= 3


def test_fingerprint_mismatch_is_refused(models_dir: Path) -> None:
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), ModelCache(1 << 30))
    recipe = {**lora_recipe(models_dir, 0.8), "fingerprint": "0" * 64}
    with pytest.raises(BadRequest, match="differs"):
        builder.build(recipe)


def test_unknown_file_is_missing_model(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    builder = ModelBuilder(ModelStore(tmp_path), default_registry(), ModelCache(1 << 30))
    with pytest.raises(MissingModel) as caught:
        builder.build(lora_recipe(models_dir, 0.8))
    # the first file of the recipe the build reaches: the LoRA's or its base checkpoint's
    assert caught.value.name in {"loras/tiny-sd15-lora.safetensors", "checkpoints/tiny-sd15.safetensors"}


def test_malformed_recipe_is_a_bad_request(models_dir: Path) -> None:
    builder = ModelBuilder(ModelStore(models_dir), default_registry(), ModelCache(1 << 30))
    with pytest.raises(BadRequest):
        builder.build({"v": 1, "steps": [{"op": "os.system", "args": ["true"]}]})
