"""Rebuilding from recipes: bit-identical outputs in a fresh process, checks, and the allowlist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.errors import FingerprintMismatch, RecipeError
from diffsplit.tracer.recipe import FileRef, Recipe, Step
from diffsplit.tracer.session import tracing
from safetensors.torch import load_file, save_file

from diffsplit.decorators import loader
from tests.tracer.tracer_probes import probe

PROBE_SCRIPT = Path(__file__).with_name("tracer_probes.py")


def rebuild_in_fresh_process(recipes: dict[str, Recipe], models_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Build every recipe in a new Python process and return its probe outputs."""
    recipes_path = tmp_path / "recipes.json"
    recipes_path.write_text(json.dumps({name: recipe.to_dict() for name, recipe in recipes.items()}))
    out_path = tmp_path / "probes.pt"
    completed = subprocess.run(
        [sys.executable, str(PROBE_SCRIPT), str(recipes_path), str(models_dir), str(out_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out_path)


def test_sd15_lora_pipeline_rebuilds_bit_identically_in_a_fresh_process(
    sd15_lora_run: Any, models_dir: Path, tmp_path: Path
) -> None:
    recorded, pipe = sd15_lora_run.trace, sd15_lora_run.pipe
    recipes = {"pipe": recorded.recipe(pipe), "unet": recorded.recipe(pipe.unet)}
    expected_unet = probe(pipe.unet)
    probes = rebuild_in_fresh_process(recipes, models_dir, tmp_path)
    assert torch.equal(probes["pipe"], sd15_lora_run.image)
    assert torch.equal(probes["unet"], expected_unet)


def test_graph_model_inputs_rebuild_bit_identically_in_a_fresh_process(
    graph_run: Any, models_dir: Path, tmp_path: Path
) -> None:
    traced, outputs = graph_run.trace, graph_run.outputs
    recipes = {
        "model": traced.node("11").input("model").model.recipe,
        "clip": traced.node("4").input("clip").model.recipe,
        "vae": traced.node("12").input("vae").model.recipe,
        "controlnet": traced.node("10").input("control_net").model.recipe,
    }
    originals = {
        "model": outputs["2"][0],
        "clip": outputs["3"][0],
        "vae": outputs["7"][0],
        "controlnet": outputs["9"][0],
    }
    probes = rebuild_in_fresh_process(recipes, models_dir, tmp_path)
    for name, original in originals.items():
        assert torch.equal(probes[name], probe(original)), name


def test_rebuild_in_process_checks_the_fingerprint(sd15_lora_run: Any, store: ModelStore) -> None:
    recipe = sd15_lora_run.trace.recipe(sd15_lora_run.pipe.text_encoder)
    rebuilt = build(recipe, store_resolver(store))
    assert type(rebuilt).__name__ == "CLIPTextModel"
    tampered = Recipe(steps=recipe.steps, select=recipe.select, fingerprint="0" * 64)
    with pytest.raises(FingerprintMismatch) as caught:
        build(tampered, store_resolver(store))
    assert caught.value.recipe_name == tampered.name()
    assert "tiny-sd15" in str(caught.value)


def test_a_different_file_behind_the_same_name_is_caught(
    sd15_lora_run: Any, store: ModelStore, tmp_path: Path
) -> None:
    recipe = sd15_lora_run.trace.recipe(sd15_lora_run.pipe.unet)
    original = store.resolve("loras", "tiny-sd15-lora.safetensors")
    changed = tmp_path / "tiny-sd15-lora.safetensors"
    save_file({key: value * 1.5 for key, value in load_file(original).items()}, changed)
    resolve = store_resolver(store)

    def swapped(ref: FileRef) -> Path:
        return changed if ref.name == original.name else resolve(ref)

    with pytest.raises(FingerprintMismatch):
        build(recipe, swapped)


def test_files_are_found_by_sha256_under_another_name(
    sd15_lora_run: Any, models_dir: Path, tmp_path: Path
) -> None:
    recipe = sd15_lora_run.trace.recipe(sd15_lora_run.pipe.unet)
    other = tmp_path / "store"
    shutil.copytree(models_dir / "diffusers", other / "diffusers")
    (other / "loras").mkdir()
    shutil.copy(models_dir / "loras" / "tiny-sd15-lora.safetensors", other / "loras" / "renamed.safetensors")
    rebuilt = build(recipe, store_resolver(ModelStore(other)))
    assert torch.equal(probe(rebuilt), probe(sd15_lora_run.pipe.unet))


SHA = "c" * 64


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (Step("os.system", args=("echo hi",)), "unknown operation"),
        (Step("diffusers.from_pretrained", cls="logging"), "not a diffusers pipeline"),
        (Step("diffusers.from_pretrained", cls="os.path"), "not allowed"),
        (Step("transformers.from_pretrained", cls="pipeline"), "not a transformers"),
        (Step("user.loader", cls="os:system"), "not among the loaders"),
        (Step("comfy.node", cls="KSampler"), "not a loader node"),
        (Step("comfy.node", cls="NoSuchNode"), "unknown node class"),
        (Step("safetensors.load_file", kwargs={"dtype": "int8"}), "unknown dtype"),
    ],
)
def test_only_allowed_operations_and_classes_run(step: Step, message: str, registry: NodeRegistry) -> None:
    def no_files(ref: FileRef) -> Path:
        raise AssertionError("no file should be read")

    with pytest.raises(RecipeError, match=message):
        build(Recipe(steps=(step,)), no_files, registry=registry)


@loader
def load_unet_folder(folder: str) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def test_user_loaders_run_only_when_allowed(models_dir: Path, store: ModelStore) -> None:
    with tracing(store=store) as recorded:
        unet = load_unet_folder(str(models_dir / "diffusers" / "tiny-sd15"))
    recipe = recorded.recipe(unet)
    (step,) = recipe.steps
    assert step.op == "user.loader" and step.cls.endswith(":load_unet_folder")
    assert step.args[0].name == "tiny-sd15"
    assert [record.op for record in recorded.calls] == ["user.loader"]
    with pytest.raises(RecipeError, match="not among the loaders"):
        build(recipe, store_resolver(store))
    rebuilt = build(recipe, store_resolver(store), user_loaders={step.cls: load_unet_folder.__wrapped__})
    assert torch.equal(probe(rebuilt), probe(unet))
