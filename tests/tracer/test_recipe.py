"""Recipes as plain data: round trips, validation, digests that are the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffsplit.tracer.errors import RecipeError
from diffsplit.tracer.recipe import (
    RECIPE_VERSION,
    FileRef,
    Recipe,
    Step,
    file_value,
    paths_overlap,
    recipe_value,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def sample_recipe() -> Recipe:
    base = FileRef(name="tiny-sd15", sha256=SHA_A, bytes=1234, folder="diffusers", kind="dir")
    lora = FileRef(name="style.safetensors", sha256=SHA_B, bytes=99, folder="loras")
    vae = Recipe(
        steps=(
            Step("diffusers.from_pretrained", cls="AutoencoderKL", file=base, kwargs={"subfolder": "vae"}),
        )
    )
    return Recipe(
        steps=(
            Step(
                "diffusers.from_pretrained",
                cls="StableDiffusionPipeline",
                file=base,
                kwargs={"torch_dtype": "float16", "vae": recipe_value(vae)},
            ),
            Step("diffusers.load_lora_weights", file=lora, kwargs={"adapter_name": "style"}, on=""),
            Step(
                "diffusers.set_adapters", kwargs={"adapter_names": ["style"], "adapter_weights": [0.7]}, on=""
            ),
            Step("torch.to", kwargs={"dtype": "float32"}, on="text_encoder"),
            Step("set", kwargs={"name": "scheduler", "value": None}, on=""),
        ),
        select="unet",
        fingerprint="f" * 64,
    )


def test_round_trips_through_dict_and_json() -> None:
    recipe = sample_recipe()
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_json(recipe.to_json(indent=2)) == recipe
    assert recipe.to_dict()["v"] == RECIPE_VERSION


def test_empty_fields_are_left_out_of_the_data() -> None:
    step = Step("diffusers.fuse_lora", on="").to_dict()
    assert step == {"op": "diffusers.fuse_lora", "on": ""}
    assert "select" not in Recipe(steps=(Step("safetensors.load_file"),)).to_dict()


def test_digest_ignores_the_fingerprint_but_not_select() -> None:
    recipe = sample_recipe()
    assert recipe.digest() == Recipe.from_dict({**recipe.to_dict(), "fingerprint": "0" * 64}).digest()
    assert recipe.digest() != recipe.with_select("vae", None).digest()
    assert recipe.build_digest() == Recipe(steps=recipe.steps, select="vae").build_digest()


def test_digest_is_the_same_in_another_process(tmp_path: Path) -> None:
    recipe = sample_recipe()
    path = tmp_path / "recipe.json"
    path.write_text(recipe.to_json(indent=3))
    code = (
        "import sys; from diffsplit.tracer.recipe import Recipe; "
        "r = Recipe.from_json(open(sys.argv[1]).read()); print(r.digest(), r.build_digest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True
        )
        digests.add(out.stdout.strip())
    assert digests == {f"{recipe.digest()} {recipe.build_digest()}"}


def test_with_select_drops_mutators_of_other_parts() -> None:
    narrowed = sample_recipe().with_select("unet", "e" * 64)
    assert [step.op for step in narrowed.steps] == [
        "diffusers.from_pretrained",
        "diffusers.load_lora_weights",
        "diffusers.set_adapters",
        "set",
    ]
    assert narrowed.fingerprint == "e" * 64
    assert [step.op for step in sample_recipe().with_select("text_encoder.encoder", None).steps][
        -2
    ] == "torch.to"


def test_files_lists_every_file_once_including_nested_recipes() -> None:
    names = [ref.name for ref in sample_recipe().files()]
    assert names == ["tiny-sd15", "style.safetensors"]


def test_paths_overlap_by_segments() -> None:
    assert paths_overlap("", "unet") and paths_overlap("unet", "unet.conv_in")
    assert not paths_overlap("unet", "unet_2") and not paths_overlap("vae", "unet")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"v": 99, "steps": [{"op": "x"}]}, "version"),
        ({"v": RECIPE_VERSION, "steps": []}, "at least one step"),
        (
            {"v": RECIPE_VERSION, "steps": [{"op": "diffusers.fuse_lora", "on": ""}]},
            "must start with a loader",
        ),
        ({"v": RECIPE_VERSION, "steps": [{"cls": "X"}]}, "needs a string 'op'"),
        ({"v": RECIPE_VERSION, "steps": [{"op": "x", "code": "rm -rf"}]}, "unknown fields"),
        (
            {
                "v": RECIPE_VERSION,
                "steps": [{"op": "x", "file": {"name": "/etc/passwd", "sha256": SHA_A, "bytes": 1}}],
            },
            "store-relative",
        ),
        (
            {"v": RECIPE_VERSION, "steps": [{"op": "x", "file": {"name": "a", "sha256": "xyz", "bytes": 1}}]},
            "malformed sha256",
        ),
        ("[]", "JSON object"),
    ],
)
def test_malformed_recipes_are_rejected_with_a_reason(data: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)  # type: ignore[arg-type]


def test_tagged_values_round_trip() -> None:
    ref = FileRef(name="x.safetensors", sha256=SHA_A, bytes=5)
    assert FileRef.from_dict(file_value(ref)["$file"]) == ref
    assert ref.short() == f"x.safetensors sha256:{SHA_A[:8]}…"


def test_recipes_are_deeply_immutable_hashable_values() -> None:
    ref = FileRef(name="a.safetensors", sha256="a" * 64, bytes=3, folder="loras")
    loader = Step(op="comfy.node", cls="CheckpointLoaderSimple", kwargs={"ckpt_name": file_value(ref)})
    inner = Recipe(steps=(loader,))
    kwargs = {"model": recipe_value(inner), "names": ["x", {"y": [1, 2]}], "lora_name": file_value(ref)}
    data = {"op": "comfy.node", "cls": "LoraLoader", "kwargs": kwargs}
    outer = Recipe(steps=(Step.from_dict(data),), select="0")
    step = outer.steps[0]
    assert isinstance(step.kwargs["model"], Recipe) and step.kwargs["model"] == inner
    assert step.kwargs["lora_name"] == ref and step.kwargs["names"] == ("x", {"y": (1, 2)})
    with pytest.raises(TypeError):
        step.kwargs["names"] = ()  # type: ignore[index]
    again = Recipe.from_dict(outer.to_dict())
    assert again == outer and hash(again) == hash(outer) and len({outer, again}) == 1
    assert outer.to_dict()["steps"][0] == data
    outer.to_dict()["steps"].clear()  # a caller's copy: the recipe keeps its steps
    assert outer.digest() == again.digest() and outer.files() == (ref,)


def test_a_step_argument_that_is_not_plain_data_is_refused() -> None:
    with pytest.raises(RecipeError, match="cannot be a object"):
        Step(op="comfy.node", kwargs={"x": object()})
