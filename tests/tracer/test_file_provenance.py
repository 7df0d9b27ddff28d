"""File-level provenance: a folder recipe names the files its loader read, each by sha256 and size.

Real diffusers and transformers loads of the tiny models, traced; the files come from the audit hook
(Python opens) and the native readers the recorder watches (safetensors, the tokenizer's Rust files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.file_reads import reading
from diffsplit.tracer.files import HashingFileRefs, complete_reads
from diffsplit.tracer.recipe import MAX_FOLDER_FILES, FileRef, FolderFile, Recipe, folder_digest
from diffsplit.tracer.session import tracing
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

SHA_A = "a" * 64
SHA_B = "b" * 64


def _paths(ref: FileRef | None) -> list[str]:
    assert ref is not None
    return [item.path for item in ref.files]


@pytest.fixture(scope="module")
def traced_pipeline(models_dir: Path, store: ModelStore):
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
    return pipe, trace


def test_each_component_recipe_lists_the_index_and_its_own_files(traced_pipeline) -> None:
    pipe, trace = traced_pipeline
    expected = {
        "unet": ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
        "vae": ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
        "text_encoder": ["text_encoder/config.json", "text_encoder/model.safetensors"],
        # vocab and merges are read by the Rust tokenizers library: seen through the tokenizer's loader
        "tokenizer": ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                      "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"],
        "scheduler": ["scheduler/scheduler_config.json"],
    }
    for component, files in expected.items():
        recipe = trace.recipe(getattr(pipe, component))
        assert _paths(recipe.steps[0].file) == ["model_index.json", *files], component
        assert recipe.size_bytes() <= 4096


def test_the_whole_pipeline_lists_every_file_it_read_and_digests_like_the_folder(
    traced_pipeline, store: ModelStore
) -> None:
    pipe, trace = traced_pipeline
    recipe = trace.recipe(pipe)
    ref = recipe.steps[0].file
    assert ref is not None and len(ref.files) == 12
    # every file of the folder was read: the listed files' digest is the store's digest of the folder
    assert ref.sha256 == store.sha256(store.resolve("diffusers", "tiny-sd15"))
    assert recipe.size_bytes() <= 4096


def test_a_folder_with_extra_files_gives_the_same_component_recipe(
    models_dir: Path, tmp_path: Path, traced_pipeline
) -> None:
    pipe, trace = traced_pipeline
    copy = tmp_path / "tiny-sd15"
    shutil.copytree(models_dir / "diffusers" / "tiny-sd15", copy)
    (copy / "README.md").write_text("a model card")
    (copy / "unet" / "diffusion_pytorch_model.onnx").write_bytes(b"an export")
    with tracing() as other:
        again = StableDiffusionPipeline.from_pretrained(str(copy))
    first, second = trace.recipe(pipe.unet).steps[0].file, other.recipe(again.unet).steps[0].file
    assert first is not None and second is not None
    assert (first.sha256, first.files) == (second.sha256, second.files)


def test_a_model_folder_alone_lists_its_config_and_weights(models_dir: Path) -> None:
    with tracing() as trace:
        unet = UNet2DConditionModel.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"),
                                                    subfolder="unet")
    assert _paths(trace.recipe(unet).steps[0].file) == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_a_tokenizer_loaded_alone_names_the_files_rust_reads(models_dir: Path) -> None:
    with tracing() as trace:
        tokenizer = CLIPTokenizer.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15" / "tokenizer"))
    assert {"vocab.json", "merges.txt"} <= set(_paths(trace.recipe(tokenizer).steps[0].file))


def test_reads_unseen_by_the_tracer_leave_the_whole_folder_named(models_dir: Path) -> None:
    unet = models_dir / "diffusers" / "tiny-sd15" / "unet"
    # a config read without its folder's weights: some reader was not seen, so no list is trusted
    assert complete_reads(unet, (unet / "config.json",)) is None
    assert complete_reads(unet, ()) is None
    both = (unet / "config.json", unet / "diffusion_pytorch_model.safetensors")
    assert complete_reads(unet, both) == both
    ref = HashingFileRefs().file_ref(unet, (unet / "config.json",))
    assert ref.files == () and ref.kind == "dir"


def test_a_read_block_sees_python_opens_and_ignores_writes(tmp_path: Path) -> None:
    source, written = tmp_path / "config.json", tmp_path / "out.json"
    source.write_text("{}")
    with reading() as block:
        json.loads(source.read_text())
        written.write_text("{}")
    assert block.stop().paths == frozenset({source})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([{"path": "../x", "sha256": SHA_A, "bytes": 1}], "segment"),
        ([{"path": "/etc/passwd", "sha256": SHA_A, "bytes": 1}], "absolute"),
        ([{"path": "a", "sha256": "A" * 64, "bytes": 1}], "sha256"),
        ([{"path": "a", "sha256": SHA_A, "bytes": -1}], "size"),
        ([{"path": "a", "sha256": SHA_A, "bytes": 1, "extra": 1}], "exactly"),
        ([{"path": "a", "sha256": SHA_A, "bytes": 1}, {"path": "a", "sha256": SHA_B, "bytes": 1}], "twice"),
        ([{"path": "a", "sha256": SHA_A, "bytes": 1}, {"path": "a/b", "sha256": SHA_B, "bytes": 1}],
         "both as a file and as a folder"),
    ],
)
def test_malformed_folder_files_are_refused(files: list[dict], message: str) -> None:
    data = {"name": "x", "sha256": SHA_A, "bytes": 1, "kind": "dir", "files": files}
    with pytest.raises(Exception, match=message):
        FileRef.from_dict(data)


def test_a_folder_reference_must_digest_and_sum_its_files() -> None:
    files = (FolderFile("a", SHA_A, 3), FolderFile("b/c", SHA_B, 4))
    good = FileRef.folder_of("x", files)
    assert good.sha256 == folder_digest(files) and good.bytes == 7
    assert FileRef.from_dict(good.to_dict()) == good
    with pytest.raises(Exception, match="not the digest"):
        FileRef.from_dict({**good.to_dict(), "sha256": SHA_A})
    with pytest.raises(Exception, match="not the sum"):
        FileRef.from_dict({**good.to_dict(), "bytes": 8})
    with pytest.raises(Exception, match="not a folder"):
        FileRef.from_dict({**good.to_dict(), "kind": "file"})
    many = [{"path": f"f{i}", "sha256": SHA_A, "bytes": 0} for i in range(MAX_FOLDER_FILES + 1)]
    with pytest.raises(Exception, match="at most"):
        FileRef.from_dict({**good.to_dict(), "files": many})


def test_a_listed_folder_survives_a_recipe_round_trip(traced_pipeline) -> None:
    pipe, trace = traced_pipeline
    recipe = trace.recipe(pipe.unet)
    assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("weights", "unet_weights"),
    [([{"unet": 0.5, "text_encoder": 0.2}], (0.5,)), (0.3, (0.3,)), (None, (None,))],
)
def test_pipeline_adapter_weights_become_the_unets_and_rebuild_it_exactly(
    models_dir: Path, store: ModelStore, weights: object, unet_weights: tuple[object, ...]
) -> None:
    from diffsplit.engine.rebuild import build, store_resolver
    from diffsplit.tracer.fingerprint import fingerprint

    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
        pipe.load_lora_weights(str(models_dir / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=weights)
    recipe = trace.recipe(pipe.unet)
    assert [step.op for step in recipe.steps] == [
        "diffusers.from_pretrained", "diffusers.pipeline_lora_into_unet", "diffusers.set_adapters"]
    assert recipe.steps[2].kwargs["weights"] == unet_weights
    assert fingerprint(build(recipe, store_resolver(store))) == fingerprint(pipe.unet)


def test_a_pipeline_wide_fuse_keeps_the_whole_pipeline_recipe(models_dir: Path, store: ModelStore) -> None:
    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
        pipe.load_lora_weights(str(models_dir / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.fuse_lora(lora_scale=0.5)
    recipe = trace.recipe(pipe.unet)
    assert [step.on for step in recipe.steps] == [None, "", ""]
    assert recipe.steps[0].file is not None and len(recipe.steps[0].file.files) == 12
