"""The model store: listing, path-escape rejection, the on-disk sha256 index, lookup by hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.store import ModelStore, StoreEntry


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def root(tiny_store_root: Path) -> Path:
    """The tiny store plus a LoRA, a non-model file, a hidden file and a diffusers pipeline folder."""
    (tiny_store_root / "loras" / "style.safetensors").write_text("lora")
    (tiny_store_root / "checkpoints" / "readme.txt").write_text("not a model")
    (tiny_store_root / "checkpoints" / ".hidden.safetensors").write_text("hidden")
    pipeline = tiny_store_root / "diffusers" / "tiny-sd"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipeline / "unet" / "config.json").write_text("{}")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_text("unet weights")
    return tiny_store_root


def test_names_lists_model_files_and_model_directories(root: Path) -> None:
    store = ModelStore(root)
    assert store.names("checkpoints") == ["base.safetensors", "sd/v15.ckpt"]
    assert store.names("loras") == ["style.safetensors"]
    assert store.names("diffusers") == ["tiny-sd"]
    assert store.names("vae") == []
    assert "checkpoints" in store.folders() and "diffusers" in store.folders()


def test_resolve_returns_paths_inside_the_store(root: Path) -> None:
    store = ModelStore(root)
    assert store.resolve("checkpoints", "sd/v15.ckpt") == root / "checkpoints" / "sd" / "v15.ckpt"
    assert store.resolve("diffusers", "tiny-sd") == root / "diffusers" / "tiny-sd"


@pytest.mark.parametrize(
    "name",
    [
        "../loras/style.safetensors",
        "sd/../../loras/style.safetensors",
        "/etc/passwd",
        "C:/x.safetensors",
        "base.safetensors\x00.txt",
        "",
        "./base.safetensors",
        "readme.txt",
        "missing.safetensors",
        ".hidden.safetensors",
    ],
)
def test_resolve_rejects_escapes_and_unknown_names(root: Path, name: str) -> None:
    store = ModelStore(root)
    with pytest.raises(ModelFileError) as caught:
        store.resolve("checkpoints", name)
    message = str(caught.value)
    assert "checkpoints/" in message
    assert "available: base.safetensors, sd/v15.ckpt" in message


def test_symlinks_the_owner_placed_are_listed_and_followed(root: Path, tmp_path: Path) -> None:
    other_drive = tmp_path / "other-drive"
    other_drive.mkdir()
    (other_drive / "big.safetensors").write_text("big weights")
    (other_drive / "nested").mkdir()
    (other_drive / "nested" / "deep.safetensors").write_text("deep weights")
    (root / "checkpoints" / "linked.safetensors").symlink_to(other_drive / "big.safetensors")
    (root / "checkpoints" / "drive").symlink_to(other_drive, target_is_directory=True)
    (root / "checkpoints" / "alias.safetensors").symlink_to(root / "loras" / "style.safetensors")
    (root / "checkpoints" / "loop").symlink_to(root / "checkpoints", target_is_directory=True)
    store = ModelStore(root)
    assert store.names("checkpoints") == [
        "alias.safetensors", "base.safetensors", "drive/big.safetensors", "drive/nested/deep.safetensors",
        "linked.safetensors", "sd/v15.ckpt",
    ]
    assert store.resolve("checkpoints", "linked.safetensors").read_text() == "big weights"
    assert store.resolve("checkpoints", "drive/nested/deep.safetensors").read_text() == "deep weights"
    assert store.sha256(store.resolve("checkpoints", "linked.safetensors")) == sha("big weights")
    assert store.find(sha256=sha("deep weights")).read_text() == "deep weights"
    # names from requests still resolve only through the listing
    for name in ("drive/../drive/big.safetensors", str(other_drive / "big.safetensors"), "drive"):
        with pytest.raises(ModelFileError):
            store.resolve("checkpoints", name)


def test_windows_separators_in_saved_names_are_read_as_slashes(root: Path) -> None:
    store = ModelStore(root)
    assert store.resolve("checkpoints", "sd\\v15.ckpt") == root / "checkpoints" / "sd" / "v15.ckpt"
    expected = root / "checkpoints" / "sd" / "v15.ckpt"
    assert store.find(name="sd\\v15.ckpt", folder="checkpoints") == expected
    with pytest.raises(ModelFileError):
        store.resolve("checkpoints", "..\\loras\\style.safetensors")


def test_a_read_only_models_folder_works_and_is_never_written(root: Path) -> None:
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        store = ModelStore(root)
        assert store.sha256(root / "checkpoints" / "base.safetensors") == sha("base weights")
        assert store.index_path.exists() and not store.index_path.is_relative_to(root)
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_extra_model_paths_yaml_adds_folders(root: Path, tmp_path: Path) -> None:
    from diffsplit.engine.extra_paths import load_extra_paths, open_store

    webui = tmp_path / "webui"
    (webui / "models" / "Lora").mkdir(parents=True)
    (webui / "models" / "Lora" / "extra.safetensors").write_text("extra lora")
    (webui / "models" / "LyCORIS").mkdir(parents=True)
    (webui / "models" / "LyCORIS" / "lyco.safetensors").write_text("lyco")
    (webui / "models" / "Lora" / "style.safetensors").write_text("shadowed")
    (tmp_path / "encoders").mkdir()
    (tmp_path / "encoders" / "te.safetensors").write_text("te")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "a111:\n"
        "    base_path: webui/\n"
        "    loras: |\n"
        "        models/Lora\n"
        "        models/LyCORIS\n"
        "comfyui:\n"
        "    is_default: true\n"
        f"    text_encoders: [{tmp_path / 'encoders'}]\n"
    )
    assert load_extra_paths(config) == {
        "loras": [webui / "models" / "Lora", webui / "models" / "LyCORIS"], "clip": [tmp_path / "encoders"],
    }
    store = open_store(root, config)
    assert store.names("loras") == ["extra.safetensors", "lyco.safetensors", "style.safetensors"]
    assert store.resolve("loras", "style.safetensors") == root / "loras" / "style.safetensors"  # root first
    assert store.resolve("loras", "lyco.safetensors").read_text() == "lyco"
    assert "clip" in store.folders() and store.names("clip") == ["te.safetensors"]
    found = store.find(sha256=sha("extra lora"), folder="loras")
    expected = StoreEntry("loras", "extra.safetensors", sha("extra lora"), len("extra lora"))
    assert store.entry(found) == expected


@pytest.mark.parametrize("text, reason", [
    ("a: [1, 2]", "must map folder names"),
    ("a:\n  loras: 3", "must be a path"),
    ("a: {base_path: 3}", "base_path"),
    ("- x", "expected sections"),
    ("a: [", "not valid YAML"),
])
def test_malformed_extra_model_paths_are_named(tmp_path: Path, text: str, reason: str) -> None:
    from diffsplit.engine.extra_paths import load_extra_paths

    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(text)
    with pytest.raises(ModelFileError, match=reason):
        load_extra_paths(config)


def test_bad_folder_names_are_rejected(root: Path) -> None:
    store = ModelStore(root)
    for folder in ("..", "checkpoints/sd", "/tmp"):
        with pytest.raises(ModelFileError, match="not a model folder"):
            store.names(folder)


def test_sha256_is_indexed_on_disk_and_reused(root: Path) -> None:
    store = ModelStore(root)
    model = root / "checkpoints" / "base.safetensors"
    assert store.sha256(model) == sha("base weights")
    index_path = store.index_path
    assert not index_path.is_relative_to(root)  # the models folder is never written to
    document = json.loads(index_path.read_text())
    entry = document["entries"]["checkpoints/base.safetensors"]
    stat = model.stat()
    assert entry == {
        "sha256": sha("base weights"),
        "bytes": stat.st_size,
        "stamp": f"{stat.st_size}:{stat.st_mtime_ns}",
    }
    written = index_path.stat().st_mtime_ns
    assert store.sha256("checkpoints/base.safetensors") == sha("base weights")
    assert ModelStore(root).sha256(model) == sha("base weights")
    assert index_path.stat().st_mtime_ns == written  # nothing new was hashed, nothing rewritten

    # A new store object trusts the index while size and mtime match: plant a marker hash.
    entry["sha256"] = "0" * 64
    index_path.write_text(json.dumps(document))
    assert ModelStore(root).sha256(model) == "0" * 64

    # Changing the file (new mtime) makes the entry stale: it is hashed again and rewritten.
    model.write_text("new weights!")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ModelStore(root).sha256(model) == sha("new weights!")
    assert json.loads(index_path.read_text())["entries"]["checkpoints/base.safetensors"]["sha256"] == sha(
        "new weights!"
    )


def test_index_merges_entries_written_by_another_store_object(root: Path) -> None:
    first, second = ModelStore(root), ModelStore(root)
    first.sha256(root / "checkpoints" / "base.safetensors")
    second.sha256(root / "loras" / "style.safetensors")
    entries = json.loads(ModelStore(root).index_path.read_text())["entries"]
    assert set(entries) == {"checkpoints/base.safetensors", "loras/style.safetensors"}


def test_index_path_can_live_elsewhere(root: Path, tmp_path: Path) -> None:
    index_path = tmp_path / "cache" / "index.json"
    store = ModelStore(root, index_path=index_path)
    store.sha256(root / "loras" / "style.safetensors")
    assert "loras/style.safetensors" in json.loads(index_path.read_text())["entries"]
    assert not ModelStore(root).index_path.exists()


def test_directory_digest_covers_relative_paths_and_hashes(root: Path) -> None:
    store = ModelStore(root)
    pipeline = root / "diffusers" / "tiny-sd"
    lines = sorted(
        [
            ("model_index.json", sha('{"_class_name": "StableDiffusionPipeline"}')),
            ("unet/config.json", sha("{}")),
            ("unet/diffusion_pytorch_model.safetensors", sha("unet weights")),
        ]
    )
    expected = hashlib.sha256("".join(f"{path}\0{digest}\n" for path, digest in lines).encode()).hexdigest()
    assert store.sha256(pipeline) == expected
    entry = store.entry(pipeline)
    assert entry == StoreEntry(
        "diffusers", "tiny-sd", expected, sum(p.stat().st_size for p in pipeline.rglob("*") if p.is_file())
    )
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").rename(
        pipeline / "unet" / "renamed.safetensors"
    )
    assert store.sha256(pipeline) != expected


def test_entry_of_a_file(root: Path) -> None:
    store = ModelStore(root)
    assert store.entry(root / "checkpoints" / "sd" / "v15.ckpt") == StoreEntry(
        "checkpoints", "sd/v15.ckpt", sha("v15 weights"), len("v15 weights")
    )
    with pytest.raises(ModelFileError, match="not inside the model store"):
        store.entry(root.parent / "elsewhere.safetensors")


def test_find_by_sha256_then_by_name(root: Path) -> None:
    store = ModelStore(root)
    (root / "checkpoints" / "copy.safetensors").write_text("v15 weights")
    assert store.find(sha256=sha("lora")) == root / "loras" / "style.safetensors"
    # the named file wins among equal-content candidates
    assert (
        store.find(sha256=sha("v15 weights"), name="sd/v15.ckpt") == root / "checkpoints" / "sd" / "v15.ckpt"
    )
    assert store.find(sha256=sha("v15 weights"), name="copy.safetensors").name == "copy.safetensors"
    # a name whose content differs does not match: the file with the right hash is found instead
    assert (
        store.find(sha256=sha("base weights"), name="sd/v15.ckpt")
        == root / "checkpoints" / "base.safetensors"
    )
    assert store.find(name="style.safetensors") == root / "loras" / "style.safetensors"
    assert (
        store.find(name="base.safetensors", folder="checkpoints") == root / "checkpoints" / "base.safetensors"
    )
    with pytest.raises(ModelFileError, match="no model with sha256"):
        store.find(sha256=sha("absent"), folder="loras")
    with pytest.raises(ModelFileError, match="not found in any"):
        store.find(name="absent.safetensors")


def test_find_by_sha256_with_size_skips_hashing_other_sizes(root: Path) -> None:
    store = ModelStore(root)
    found = store.find(sha256=sha("lora"), size=len("lora"))
    assert found == root / "loras" / "style.safetensors"
    entries = json.loads(ModelStore(root).index_path.read_text())["entries"]
    assert set(entries) == {"loras/style.safetensors"}  # no other file had that size


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a directory"):
        ModelStore(tmp_path / "nope")
