"""Recipes name files, never paths; each op carries only its allowlisted keywords; nothing runs before.

Every refusal here must come before any file is resolved or any library call is
made (the resolver of most tests fails the test when it is asked for a file),
and its text must hold neither the store's path nor a path the recipe carried.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.errors import RecipeError
from diffsplit.tracer.files import StoreFileRefs
from diffsplit.tracer.recipe import FileRef, Recipe, Step, file_value
from safetensors.torch import save_file

SHA = "a" * 64


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    """The built-in node classes."""
    return default_registry()


@pytest.fixture
def store_root(tmp_path: Path, models_dir: Path) -> Path:
    """A store holding the tiny SD 1.5 folder and LoRA (links to the session's model set)."""
    root = tmp_path / "store"
    for folder, name in (("diffusers", "tiny-sd15"), ("loras", "tiny-sd15-lora.safetensors")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).symlink_to(models_dir / folder / name)
    (root / "checkpoints").mkdir()
    return root


def no_files(ref: FileRef) -> Path:
    raise AssertionError(f"{ref.name} was resolved: the recipe should have been refused before running")


def sd15_ref(root: Path) -> FileRef:
    return StoreFileRefs(ModelStore(root)).file_ref(root / "diffusers" / "tiny-sd15")


def refused(recipe: Recipe, resolve: Any = no_files, registry: NodeRegistry | None = None) -> str:
    with pytest.raises(RecipeError) as caught:
        build(recipe, resolve, registry=registry)
    return str(caught.value)


def test_custom_pipeline_with_trust_remote_code_is_refused_and_its_code_never_runs(store_root: Path) -> None:
    marker = store_root.parent / "rce-marker"
    evil = store_root / "loras" / "x.py"  # as an upload would have placed it
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    step = Step("diffusers.from_pretrained", cls="StableDiffusionPipeline", file=sd15_ref(store_root),
                kwargs={"custom_pipeline": str(evil), "trust_remote_code": True})
    message = refused(Recipe(steps=(step,)), store_resolver(ModelStore(store_root)))
    assert not marker.exists(), "the uploaded Python file ran"
    assert "custom_pipeline" in message and "refused" in message and "run Python code" in message
    assert str(store_root) not in message and str(evil) not in message


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"cache_dir": "/tmp/elsewhere"}, "outside the worker's store"),
        ({"revision": "main"}, "download"),
        ({"token": "hf_x"}, "download"),
        ({"proxies": {"https": "http://127.0.0.1:1"}}, "download"),
        ({"force_download": True}, "download"),
        ({"from_flax": True}, "pickled"),
        ({"use_safetensors": False}, "true or left out"),
        ({"local_files_only": False}, "true or left out"),
        ({"subfolder": "../../etc"}, "plain name"),
        ({"subfolder": "unet/../../x"}, "plain name"),
        ({"variant": "../fp16"}, "variant name"),
        ({"torch_dtype": "int8"}, "unknown dtype"),
        ({"device_map": "auto"}, "places weights"),
        ({"whatever": 1}, "not allowed"),
        ({"vae": "/tmp/some/vae"}, "must be a nested recipe"),
    ],
)
def test_from_pretrained_keywords_outside_the_allowlist_are_refused_before_running(
    kwargs: dict[str, Any], words: str
) -> None:
    ref = FileRef(name="tiny-sd15", sha256=SHA, bytes=1, folder="diffusers", kind="dir")
    step = Step("diffusers.from_pretrained", cls="StableDiffusionPipeline", file=ref, kwargs=kwargs)
    message = refused(Recipe(steps=(step,)))
    assert words in message
    assert "/tmp/" not in message and "127.0.0.1" not in message


def test_safetensors_load_file_of_a_plain_path_is_refused_and_its_tensors_never_come_back(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside" / "secret.safetensors"
    outside.parent.mkdir()
    save_file({"secret": torch.arange(4.0)}, outside)
    for step in (Step("safetensors.load_file", args=(str(outside),)),
                 Step("safetensors.load_file", kwargs={"filename": str(outside)})):
        message = refused(Recipe(steps=(step,)))
        assert str(outside) not in message and str(tmp_path) not in message
    message = refused(Recipe(steps=(Step("safetensors.load_file", args=(str(outside),)),)))
    assert "plain string" in message and "store reference" in message


def test_a_missing_and_an_existing_outside_path_get_the_same_refusal(tmp_path: Path) -> None:
    present = tmp_path / "present.safetensors"
    save_file({"x": torch.zeros(1)}, present)
    texts = [
        refused(Recipe(steps=(Step("safetensors.load_file", args=(str(path),)),))).partition("]: ")[2]
        for path in (present, tmp_path / "absent.safetensors")
    ]
    assert texts[0] == texts[1] and "plain string" in texts[0]


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "loras/../../x.safetensors", "/etc/passwd", "a//b", "C:/x"]
)
def test_file_references_with_dotdot_or_absolute_names_do_not_parse(name: str) -> None:
    data = {"v": 1, "steps": [{"op": "safetensors.load_file",
                               "file": {"name": name, "sha256": SHA, "bytes": 1}}]}
    with pytest.raises(RecipeError, match="store-relative") as caught:
        Recipe.from_dict(data)
    assert name not in str(caught.value)


def test_a_file_reference_folder_must_be_one_folder_name() -> None:
    with pytest.raises(RecipeError, match="folder"):
        FileRef(name="x.safetensors", sha256=SHA, bytes=1, folder="../loras")


def test_numbers_that_json_cannot_hold_do_not_parse() -> None:
    with pytest.raises(RecipeError, match="finite"):
        Step("diffusers.fuse_lora", kwargs={"lora_scale": float("inf")}, on="")


@pytest.mark.parametrize(
    ("step", "words"),
    [
        (Step("diffusers.load_lora_weights", file=FileRef(name="lora.bin", sha256=SHA, bytes=1), on=""),
         "pickled weights"),
        (Step("diffusers.load_lora_weights", file=FileRef(name="x", sha256=SHA, bytes=1, kind="dir"),
              kwargs={"weight_name": "pytorch_lora_weights.bin"}, on=""), "safetensors"),
        (Step("diffusers.load_lora_weights", file=FileRef(name="x", sha256=SHA, bytes=1, kind="dir"),
              kwargs={"weight_name": "../../x.safetensors"}, on=""), "plain name"),
        (Step("diffusers.load_lora_weights", args=("/tmp/lora.safetensors",), on=""), "plain string"),
        (Step("diffusers.load_lora_weights", args=({"w": 1},), on=""), "nested recipe of its weights"),
        (Step("diffusers.load_textual_inversion", file=FileRef(name="emb.pt", sha256=SHA, bytes=1), on=""),
         "pickled weights"),
        (Step("diffusers.from_single_file", cls="StableDiffusionPipeline",
              file=FileRef(name="model.ckpt", sha256=SHA, bytes=1)), "pickled weights"),
        (Step("diffusers.from_single_file", cls="StableDiffusionPipeline",
              file=FileRef(name="model.safetensors", sha256=SHA, bytes=1),
              kwargs={"original_config": "/tmp/v1.yaml"}), "plain string"),
        (Step("transformers.from_pretrained", cls="CLIPTextModel",
              file=FileRef(name="te", sha256=SHA, bytes=1, kind="dir"), kwargs={"weights_only": False}),
         "pickled"),
        (Step("transformers.from_pretrained", cls="CLIPTextModel",
              file=FileRef(name="te", sha256=SHA, bytes=1, kind="dir"),
              kwargs={"attn_implementation": "kernels-community/flash-attn"}), "one of eager, sdpa"),
        (Step("transformers.from_pretrained", cls="CLIPTokenizer", args=("/tmp/vocab.json",),
              file=FileRef(name="tok", sha256=SHA, bytes=1, kind="dir")), "plain string"),
        (Step("transformers.from_pretrained", cls="CLIPTextModel", args=("/tmp/te",)), "plain string"),
        (Step("transformers.from_pretrained", cls="CLIPTextModel"), "needs its file"),
        (Step("diffusers.from_config", cls="DDIMScheduler", args=("/tmp/scheduler",)), "mapping"),
        (Step("diffusers.from_config", cls="UNet2DConditionModel", args=({},)), "not a diffusers scheduler"),
        (Step("diffusers.from_config", cls="DDIMScheduler", kwargs={"config": {"x": "/etc/passwd"}}),
         "path-like"),
        (Step("diffusers.set_adapters", kwargs={"adapter_names": "../x"}, on=""), "plain name"),
        (Step("diffusers.fuse_lora", kwargs={"components": ["unet"], "lora_scale": "1"}, on=""),
         "finite number"),
        (Step("torch.to", kwargs={}, on=""), "needs the keyword"),
        (Step("set", kwargs={"name": "scheduler", "value": "/tmp/sched"}, on=""), "nested recipe"),
        (Step("safetensors.load_file", file=FileRef(name="x.safetensors", sha256=SHA, bytes=1),
              kwargs={"device": "/dev/null"}), "device name"),
        (Step("user.loader", cls="m:f", args=("/tmp/model.safetensors",)), "plain string"),
        (Step("user.loader", cls="m:f", kwargs={"path": "../model.safetensors"}), "path-like"),
    ],
)
def test_arguments_outside_the_op_declarations_are_refused(step: Step, words: str) -> None:
    steps = (step,) if not step.is_mutator else (_scheduler_step(), step)
    message = refused(Recipe(steps=steps))
    assert words in message
    assert "/tmp/" not in message and "/etc/" not in message and "/dev/" not in message


def _scheduler_step() -> Step:
    return Step("diffusers.from_config", cls="DDIMScheduler", args=({},))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ckpt_name": "/tmp/outside.safetensors"}, "store reference"),
        ({"ckpt_name": "../../outside.safetensors"}, "store reference"),
        ({"ckpt_name": file_value(FileRef("x.safetensors", SHA, 1)), "extra": 1}, "not declared"),
        ({}, "is missing"),
    ],
)
def test_loader_node_inputs_are_checked_against_the_node_declaration(
    kwargs: dict[str, Any], words: str, registry: NodeRegistry
) -> None:
    step = Step("comfy.node", cls="CheckpointLoaderSimple", kwargs=kwargs)
    message = refused(Recipe(steps=(step,)), registry=registry)
    assert words in message and "/tmp/" not in message


def test_loader_node_widgets_keep_their_declared_ranges_and_models_are_recipes(
    registry: NodeRegistry,
) -> None:
    checkpoint = {"ckpt_name": file_value(FileRef("x.safetensors", SHA, 1))}
    base = Recipe(steps=(Step("comfy.node", cls="CheckpointLoaderSimple", kwargs=checkpoint),), select="0")
    lora = {"model": {"$recipe": base.to_dict()}, "clip": {"$recipe": base.to_dict()},
            "lora_name": file_value(FileRef("l.safetensors", SHA, 1)), "strength_clip": 1.0}
    too_strong = Step("comfy.node", cls="LoraLoader", kwargs={**lora, "strength_model": 1000.0})
    assert "above the maximum" in refused(Recipe(steps=(too_strong,)), registry=registry)
    not_a_recipe = Step("comfy.node", cls="LoraLoader", kwargs={**lora, "model": "x", "strength_model": 1.0})
    assert "nested recipe" in refused(Recipe(steps=(not_a_recipe,)), registry=registry)
    passthrough = Step("comfy.node", cls="LatentUpscale", kwargs={"width": 0, "height": 0})
    assert "not a loader node" in refused(Recipe(steps=(passthrough,)), registry=registry)


def test_a_refusal_in_a_nested_recipe_stops_the_whole_recipe_before_anything_runs(tmp_path: Path) -> None:
    inner = Recipe(steps=(Step("safetensors.load_file", args=(str(tmp_path / "x.safetensors"),)),))
    outer = Recipe(steps=(Step("diffusers.from_pretrained", cls="StableDiffusionPipeline",
                               file=FileRef(name="tiny-sd15", sha256=SHA, bytes=1, kind="dir"),
                               kwargs={"vae": {"$recipe": inner.to_dict()}}),))
    message = refused(outer)
    assert "plain string" in message and str(tmp_path) not in message


class _Touch:
    """Unpickling this creates ``path`` (it stands for any code a pickle can run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_a_pickled_checkpoint_with_code_is_refused_by_the_loader_node_and_its_code_never_runs(
    store_root: Path, registry: NodeRegistry
) -> None:
    marker = store_root.parent / "pickle-marker"
    evil = store_root / "checkpoints" / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Touch(marker)}, evil, pickle_module=pickle)
    store = ModelStore(store_root)
    ref = StoreFileRefs(store).file_ref(evil)
    step = Step("comfy.node", cls="CheckpointLoaderSimple", kwargs={"ckpt_name": file_value(ref)})
    message = refused(Recipe(steps=(step,), select="0"), store_resolver(store), registry)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert "checkpoints/evil.ckpt" in message
    assert str(store_root) not in message and str(evil.resolve()) not in message


def test_loader_errors_name_files_as_the_recipe_does_never_by_local_path(store_root: Path) -> None:
    store = ModelStore(store_root)
    step = Step("diffusers.from_pretrained", cls="UNet2DConditionModel", file=sd15_ref(store_root),
                kwargs={"subfolder": "no-such-part"})
    message = refused(Recipe(steps=(step,)), store_resolver(store))
    assert "diffusers/tiny-sd15" in message
    assert str(store_root) not in message and str((store_root / "diffusers").resolve()) not in message


def test_the_traced_sd15_lora_recipe_still_builds_with_safe_loading_forced(store_root: Path) -> None:
    store = ModelStore(store_root)
    refs = StoreFileRefs(store)
    lora = refs.file_ref(store_root / "loras" / "tiny-sd15-lora.safetensors")
    steps = (
        Step("diffusers.from_pretrained", cls="StableDiffusionPipeline", file=sd15_ref(store_root),
             kwargs={"torch_dtype": "float32", "use_safetensors": True}),
        Step("diffusers.load_lora_weights", file=lora, kwargs={"adapter_name": "style"}, on=""),
        Step("diffusers.set_adapters", kwargs={"adapter_names": ["style"], "adapter_weights": [0.7]}, on=""),
    )
    unet = build(Recipe(steps=steps, select="unet"), store_resolver(store))
    assert isinstance(unet, torch.nn.Module)
    assert any("lora" in name for name, _ in unet.named_parameters())
