"""A loader's path as users write it: relative to the working directory, or a hub id in the local cache.

Both name files on this machine, so both get a recipe naming the folder by sha256 (the README's own example
uses a relative folder). Nothing is downloaded: the hub cache is only read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.hub_cache import loader_path
from diffsplit.tracer.recipe import FileRef
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline

from tests.hub_cache_layout import REVISION, hub_cache


def _names_the_unet_files(ref: FileRef, store: ModelStore) -> None:
    """``ref`` lists the pipeline's index and its UNet's files, each by the sha256 the store knows."""
    folder = store.resolve("diffusers", "tiny-sd15")
    assert [item.path for item in ref.files] == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    for item in ref.files:
        assert item.sha256 == store.sha256(folder / item.path)
        assert item.bytes == (folder / item.path).stat().st_size


def test_a_relative_folder_gets_the_same_recipe_as_its_absolute_path(
    models_dir: Path, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models_dir.parent)
    relative = str(Path(models_dir.name) / "diffusers" / "tiny-sd15")
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(relative)
    recipe = trace.recipe(pipe.unet)
    base = recipe.steps[0]
    assert base.file is not None and base.file.kind == "dir"
    _names_the_unet_files(base.file, store)
    assert str(models_dir) not in recipe.to_json()
    rebuilt = build(recipe, store_resolver(store))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)


def test_a_hub_id_in_the_local_cache_is_named_by_its_files(
    models_dir: Path, store: ModelStore, tmp_path: Path
) -> None:
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-sd15", models_dir / "diffusers" / "tiny-sd15")
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained("tiny-org/tiny-sd15", cache_dir=str(cache))
    recipe = trace.recipe(pipe.unet)
    base = recipe.steps[0]
    assert base.file is not None and base.file.kind == "dir"
    # the snapshot holds the same files as the store's folder: the same sha256s, so any worker finds them
    _names_the_unet_files(base.file, store)
    assert str(tmp_path) not in recipe.to_json()
    assert "cache_dir" not in recipe.steps[0].kwargs
    rebuilt = build(recipe, store_resolver(store))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)


def test_only_existing_paths_and_cached_repositories_resolve(models_dir: Path, tmp_path: Path) -> None:
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-sd15", models_dir / "diffusers" / "tiny-sd15")
    found = loader_path("tiny-org/tiny-sd15", cache_dir=str(cache))
    assert found is not None and found.name == REVISION
    assert loader_path("tiny-org/tiny-sd15", revision="main", cache_dir=str(cache)) == found
    for absent in ("tiny-org/absent", "../tiny-org/tiny-sd15", "a/b/c", "", str(tmp_path / "none")):
        assert loader_path(absent, cache_dir=str(cache)) is None, absent
