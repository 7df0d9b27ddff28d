"""A loader's path as users write it: relative to the working directory, or a hub id in the local cache.

Both name files on this machine, so both get a recipe naming the folder by sha256 (the README's own example
uses a relative folder). Nothing is downloaded: the hub cache is only read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.folder_views import FolderViews
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


@pytest.mark.parametrize("source", ["hub id", "local folder"])
def test_a_lora_from_a_folder_with_weight_name_is_named_by_the_file_read(
    models_dir: Path, store: ModelStore, tmp_path: Path, source: str
) -> None:
    lora = models_dir / "loras" / "tiny-sd15-lora.safetensors"
    folder = tmp_path / "lora-repo"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    (folder / "other.safetensors").write_bytes(b"not read")
    location, options = str(folder), {}
    if source == "hub id":
        cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-lora", folder)
        location, options = "tiny-org/tiny-lora", {"cache_dir": str(cache)}
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
        pipe.load_lora_weights(location, weight_name="pytorch_lora_weights.safetensors", adapter_name="style",
                               **options)
    recipe = trace.recipe(pipe.unet)
    lora_step = recipe.steps[1]
    assert lora_step.file is not None and lora_step.file.kind == "dir"
    # only the file the pipeline read, by the sha256 the store knows it by under its own name
    assert [(item.path, item.sha256) for item in lora_step.file.files] == [
        ("pytorch_lora_weights.safetensors", store.sha256(lora))]
    assert str(tmp_path) not in recipe.to_json()
    rebuilt = build(recipe, store_resolver(store, FolderViews([store.find_file], root=tmp_path / "views")))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)


@pytest.mark.parametrize("keyword", ["torch_dtype", "dtype"])
def test_a_component_built_alone_keeps_the_pipelines_dtype_whichever_keyword_gave_it(
    models_dir: Path, store: ModelStore, keyword: str
) -> None:
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"),
                                                       **{keyword: torch.float16})
    for component in ("unet", "text_encoder", "vae"):
        rebuilt = build(trace.recipe(getattr(pipe, component)), store_resolver(store))
        assert next(rebuilt.parameters()).dtype == torch.float16, component
        assert fingerprint(rebuilt) == fingerprint(getattr(pipe, component)), component
