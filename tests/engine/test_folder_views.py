"""A folder recipe rebuilt from files found by sha256, whatever the layout, store or Hugging Face cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from diffsplit.engine.folder_views import FolderViews, MissingFolderFile
from diffsplit.engine.hub_cache_files import HubCacheFiles
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.recipe import FileRef, FolderFile
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def traced(models_dir: Path):
    with tracing() as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
    return pipe, trace


def _relaid_store(source: Path, root: Path) -> ModelStore:
    """The UNet's files as a model folder of their own, under other names, beside unrelated extra files."""
    unet = root / "diffusers" / "some-unet"
    unet.mkdir(parents=True)
    shutil.copyfile(source / "unet" / "config.json", unet / "config.json")
    shutil.copyfile(source / "unet" / "diffusion_pytorch_model.safetensors",
                    unet / "diffusion_pytorch_model.safetensors")
    (unet / "README.md").write_text("extra")
    other = root / "diffusers" / "index-only"
    other.mkdir()
    shutil.copyfile(source / "model_index.json", other / "model_index.json")
    return ModelStore(root, index_path=root.parent / f"{root.name}-index.json")


def test_a_store_in_another_layout_serves_the_recipe(traced, models_dir: Path, tmp_path: Path) -> None:
    pipe, trace = traced
    store = _relaid_store(models_dir / "diffusers" / "tiny-sd15", tmp_path / "store")
    views = FolderViews([store.find_file], tmp_path / "views")
    rebuilt = build(trace.recipe(pipe.unet), store_resolver(store, views))
    assert fingerprint(rebuilt) == fingerprint(pipe.unet)
    (view,) = [path for path in (tmp_path / "views").iterdir() if not path.name.startswith(".")]
    link = view / "unet" / "diffusion_pytorch_model.safetensors"
    assert link.resolve() == (tmp_path / "store" / "diffusers" / "some-unet" / link.name).resolve()
    assert sorted(p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file()) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_a_missing_file_is_named_with_its_sha256(traced, models_dir: Path, tmp_path: Path) -> None:
    pipe, trace = traced
    store = _relaid_store(models_dir / "diffusers" / "tiny-sd15", tmp_path / "store")
    (tmp_path / "store" / "diffusers" / "some-unet" / "config.json").unlink()
    recipe = trace.recipe(pipe.unet)
    config = next(item for item in recipe.steps[0].file.files if item.path == "unet/config.json")
    with pytest.raises(MissingFolderFile) as caught:
        FolderViews([store.find_file], tmp_path / "views").view(recipe.steps[0].file)
    assert caught.value.name == "diffusers/tiny-sd15/unet/config.json"
    assert caught.value.item == config and config.sha256 in str(caught.value)


def test_views_are_reused_and_a_changed_file_makes_a_new_one(tmp_path: Path) -> None:
    first, second = tmp_path / "files" / "a.bin", tmp_path / "files" / "b.json"
    first.parent.mkdir()
    first.write_bytes(b"weights")
    second.write_bytes(b"{}")
    located = {_sha256(first): first, _sha256(second): second}
    views = FolderViews([lambda sha256, size: located.get(sha256)], tmp_path / "views")
    ref = FileRef.folder_of("m", (FolderFile("w/a.bin", _sha256(first), 7),
                                  FolderFile("b.json", _sha256(second), 2)))
    view = views.view(ref)
    assert views.view(ref) == view
    assert (view / "w" / "a.bin").read_bytes() == b"weights"
    other = tmp_path / "files" / "copy.bin"
    shutil.copyfile(first, other)
    located[_sha256(first)] = other  # the same content found elsewhere: another view, the old one intact
    assert views.view(ref) != view and (view / "w" / "a.bin").read_bytes() == b"weights"


def test_store_find_file_sees_files_inside_model_folders_and_rechecks_changed_ones(
    models_dir: Path, tmp_path: Path
) -> None:
    store = _relaid_store(models_dir / "diffusers" / "tiny-sd15", tmp_path / "store")
    config = tmp_path / "store" / "diffusers" / "some-unet" / "config.json"
    digest, size = _sha256(config), config.stat().st_size
    assert store.find_file(digest, size) == config  # not indexed yet: hashed because the size matches
    assert store.find_file(digest, size + 1) is None
    text = config.read_text()
    config.write_text(text.replace("{", "[", 1))  # same size, other content
    assert store.find_file(digest, size) is None
    assert store.find_file(_sha256(config), size) == config


def test_a_hub_cache_serves_lfs_blobs_by_name_and_small_blobs_by_hash(tmp_path: Path) -> None:
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    weights, config = b"w" * 100, b'{"a": 1}'
    lfs = blobs / hashlib.sha256(weights).hexdigest()
    lfs.write_bytes(weights)
    small = blobs / hashlib.sha1(b"blob " + config).hexdigest()
    small.write_bytes(config)
    cache = HubCacheFiles(tmp_path / "hub")
    assert cache.find_file(lfs.name, 100) == lfs
    assert cache.find_file(lfs.name, 99) is None
    assert cache.find_file(_sha256(small), len(config)) == small
    assert cache.find_file("c" * 64, len(config)) is None
    assert HubCacheFiles(tmp_path / "absent").find_file(lfs.name, 100) is None
