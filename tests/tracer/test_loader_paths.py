"""A loader's path as users write it: relative to the working directory, or a hub id in the local cache.

Both name files on this machine, so both get a recipe naming the folder by sha256 (the README's own example
uses a relative folder). Nothing is downloaded: the hub cache is only read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.hub_cache import loader_path
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline

_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache holding ``folder`` as ``repo_id`` at ``main``, in the hub library's layout."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / _REVISION
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = blobs / f"{len(list(blobs.iterdir())):04d}"
        shutil.copyfile(source, blob)
        target = snapshot / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(_REVISION)
    return root


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
    assert base.file.sha256 == store.sha256(store.resolve("diffusers", "tiny-sd15"))
    assert str(models_dir) not in recipe.to_json()
    rebuilt = build(recipe, store_resolver(store))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)


def test_a_hub_id_in_the_local_cache_is_named_by_its_files(
    models_dir: Path, store: ModelStore, tmp_path: Path
) -> None:
    cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-sd15", models_dir / "diffusers" / "tiny-sd15")
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained("tiny-org/tiny-sd15", cache_dir=str(cache))
    recipe = trace.recipe(pipe.unet)
    base = recipe.steps[0]
    assert base.file is not None and base.file.kind == "dir"
    # the snapshot holds the same files as the store's folder: the same digest, so any worker finds it
    assert base.file.sha256 == store.sha256(store.resolve("diffusers", "tiny-sd15"))
    assert str(tmp_path) not in recipe.to_json()
    assert "cache_dir" not in recipe.steps[0].kwargs
    rebuilt = build(recipe, store_resolver(store))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)


def test_only_existing_paths_and_cached_repositories_resolve(models_dir: Path, tmp_path: Path) -> None:
    cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-sd15", models_dir / "diffusers" / "tiny-sd15")
    found = loader_path("tiny-org/tiny-sd15", cache_dir=str(cache))
    assert found is not None and found.name == _REVISION
    assert loader_path("tiny-org/tiny-sd15", revision="main", cache_dir=str(cache)) == found
    for absent in ("tiny-org/absent", "../tiny-org/tiny-sd15", "a/b/c", "", str(tmp_path / "none")):
        assert loader_path(absent, cache_dir=str(cache)) is None, absent
