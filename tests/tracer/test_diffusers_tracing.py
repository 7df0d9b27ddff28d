"""Tracing real diffusers code on the tiny models: recipes, select paths and honest refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.fingerprint import fingerprint
from diffsplit.tracer.recipe import FileRef, Recipe
from diffsplit.tracer.session import trace, tracing
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel


def sd15(models_dir: Path) -> str:
    return str(models_dir / "diffusers" / "tiny-sd15")


def lora(models_dir: Path) -> str:
    return str(models_dir / "loras" / "tiny-sd15-lora.safetensors")


def test_unet_recipe_is_base_plus_lora_plus_adapters(sd15_lora_run: Any, store: ModelStore) -> None:
    recipe = sd15_lora_run.trace.recipe(sd15_lora_run.pipe.unet)
    # the pipeline's LoRA steps become steps on its UNet alone: a worker builds no text encoder or VAE
    assert [(step.op, step.on) for step in recipe.steps] == [
        ("diffusers.from_pretrained", None),
        ("diffusers.pipeline_lora_into_unet", "unet"),
        ("diffusers.set_adapters", "unet"),
    ]
    base, with_lora, adapters = recipe.steps
    assert base.cls == "StableDiffusionPipeline"
    assert base.file is not None
    assert (base.file.name, base.file.folder, base.file.kind) == ("tiny-sd15", "diffusers", "dir")
    # the UNet alone needs the pipeline's index and its own files
    assert [item.path for item in base.file.files] == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert with_lora.cls == "StableDiffusionPipeline"  # the pipeline class reads and converts the file
    assert with_lora.file is not None and with_lora.file.folder == "loras"
    assert with_lora.file.sha256 == store.sha256(store.resolve("loras", "tiny-sd15-lora.safetensors"))
    assert dict(with_lora.kwargs) == {"adapter_name": "style"}
    assert dict(adapters.kwargs) == {"adapter_names": ("style",), "weights": (0.7,)}
    assert recipe.select == "unet"
    assert recipe.fingerprint == fingerprint(sd15_lora_run.pipe.unet)


def test_the_text_encoder_recipe_keeps_the_pipeline_steps(sd15_lora_run: Any, store: ModelStore) -> None:
    recipe = sd15_lora_run.trace.recipe(sd15_lora_run.pipe.text_encoder)
    assert [(step.op, step.on) for step in recipe.steps] == [
        ("diffusers.from_pretrained", None),
        ("diffusers.load_lora_weights", ""),
        ("diffusers.set_adapters", ""),
    ]
    base = recipe.steps[0]
    assert base.file is not None and base.file.sha256 == store.sha256(store.resolve("diffusers", "tiny-sd15"))
    assert dict(recipe.steps[2].kwargs) == {"adapter_names": ("style",), "adapter_weights": (0.7,)}


def test_recipes_are_small_and_name_no_local_paths(sd15_lora_run: Any, models_dir: Path) -> None:
    for part in ("unet", "text_encoder", "vae", "scheduler", "tokenizer"):
        recipe = sd15_lora_run.trace.recipe(getattr(sd15_lora_run.pipe, part))
        text = recipe.to_json()
        assert recipe.size_bytes() <= 4096
        assert str(models_dir) not in text and "/tmp" not in text


def test_parts_of_a_pipeline_are_selected_by_path(sd15_lora_run: Any) -> None:
    pipe, recorded = sd15_lora_run.pipe, sd15_lora_run.trace
    assert recorded.recipe(pipe.text_encoder).select == "text_encoder"
    assert recorded.recipe(pipe.scheduler).select == "scheduler"
    assert recorded.recipe(pipe.unet.conv_in).select == "unet.conv_in"
    assert recorded.recipe(pipe.unet.down_blocks[1]).select == "unet.down_blocks.1"
    assert recorded.recipe(pipe).select == ""


def test_report_lists_calls_and_objects(sd15_lora_run: Any) -> None:
    text = sd15_lora_run.trace.report()
    assert "#1 StableDiffusionPipeline.from_pretrained(tiny-sd15)" in text
    assert "load_lora_weights(tiny-sd15-lora.safetensors, adapter_name='style')" in text
    assert "StableDiffusionPipeline ← #1 then #2, #3" in text
    assert sd15_lora_run.trace.errors == ()


def test_weights_edited_in_place_are_refused(models_dir: Path) -> None:
    with tracing() as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir))
        with torch.no_grad():
            pipe.unet.conv_in.weight.add_(1)
    with pytest.raises(NotOffloadable) as caught:
        recorded.recipe(pipe.unet)
    assert "UNet2DConditionModel at unet" in caught.value.obj_description
    assert "conv_in.weight was modified in place" in caught.value.reason
    with pytest.raises(NotOffloadable):
        recorded.recipe(pipe)
    assert recorded.recipe(pipe.text_encoder).select == "text_encoder"


def test_a_replaced_submodule_is_refused(models_dir: Path) -> None:
    with tracing() as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir))
    pipe.vae.post_quant_conv = torch.nn.Conv2d(4, 4, 1)
    refusal = recorded.explain(pipe.vae)
    assert isinstance(refusal, NotOffloadable)
    assert "post_quant_conv.weight was replaced" in refusal.reason


def test_modules_built_by_hand_are_refused() -> None:
    with tracing() as recorded:
        net = torch.nn.Linear(2, 2)
    with pytest.raises(NotOffloadable, match="no known loader produced it"):
        recorded.recipe(net)


def test_a_model_passed_to_from_pretrained_becomes_a_nested_recipe(
    models_dir: Path, store: ModelStore
) -> None:
    with tracing(store=store) as recorded:
        vae = AutoencoderKL.from_pretrained(sd15(models_dir), subfolder="vae")
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir), vae=vae)
        pipe.to(torch.float64)
    recipe = recorded.recipe(pipe)
    nested = recipe.steps[0].kwargs["vae"]
    assert isinstance(nested, Recipe) and nested.steps[0].kwargs == {"subfolder": "vae"}
    assert recipe.steps[0].to_dict()["kwargs"]["vae"] == {"$recipe": nested.to_dict()}
    assert [step.op for step in recipe.steps[1:]] == ["torch.to"]
    rebuilt = build(recipe, store_resolver(store))
    assert rebuilt.vae.dtype == torch.float64
    vae_recipe = recorded.recipe(pipe.vae)
    assert vae_recipe.select == "vae" and vae_recipe.steps[-1].op == "torch.to"


def test_a_mutation_through_a_pipeline_reaches_a_separately_loaded_part(models_dir: Path) -> None:
    with tracing() as recorded:
        unet = UNet2DConditionModel.from_pretrained(sd15(models_dir), subfolder="unet")
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir), unet=unet)
        pipe.load_lora_weights(lora(models_dir))
    recipe = recorded.recipe(unet)
    assert recipe.select == "unet"
    assert [step.op for step in recipe.steps] == ["diffusers.from_pretrained", "diffusers.load_lora_weights"]


def test_swapped_components_become_set_steps(models_dir: Path, store: ModelStore) -> None:
    with tracing(store=store) as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir))
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    recipe = recorded.recipe(pipe)
    assert [step.op for step in recipe.steps] == ["diffusers.from_pretrained", "set"]
    assert recipe.steps[1].kwargs["name"] == "scheduler"
    assert isinstance(build(recipe, store_resolver(store)).scheduler, EulerDiscreteScheduler)
    assert [step.op for step in recorded.recipe(pipe.unet).steps] == ["diffusers.from_pretrained"]
    pipe.vae = AutoencoderKL(**pipe.vae.config)
    with pytest.raises(NotOffloadable, match="AutoencoderKL"):
        recorded.recipe(pipe)


def test_dtype_changes_are_steps_and_device_moves_are_not(models_dir: Path) -> None:
    with tracing() as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir))
        pipe.text_encoder.to(torch.float64)
        pipe.unet.to(torch.float64)
        pipe.unet.to(torch.float32)
        pipe.to("cpu")
    encoder = recorded.recipe(pipe.text_encoder)
    assert [(step.op, step.on, dict(step.kwargs)) for step in encoder.steps[1:]] == [
        ("torch.to", "text_encoder", {"dtype": "float64"})
    ]
    assert [step.op for step in recorded.recipe(pipe.unet).steps] == ["diffusers.from_pretrained"]


def test_a_mutator_that_raised_leaves_its_object_unexplained(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with tracing() as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir))
        with pytest.raises(Exception):  # noqa: B017 - whatever diffusers raises for a corrupt file
            pipe.load_lora_weights(str(broken))
    with pytest.raises(NotOffloadable, match="load_lora_weights raised"):
        recorded.recipe(pipe.unet)


def test_trace_runs_a_function_and_keeps_its_result(models_dir: Path) -> None:
    def load() -> StableDiffusionPipeline:
        return StableDiffusionPipeline.from_pretrained(sd15(models_dir))

    recorded = trace(load)
    assert isinstance(recorded.result, StableDiffusionPipeline)
    assert recorded.recipe(recorded.result.vae).select == "vae"
    assert [record.op for record in recorded.calls] == ["diffusers.from_pretrained"]


def test_textual_inversion_keeps_its_token_and_hub_credentials_are_dropped(
    models_dir: Path, store: ModelStore, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    embedding = tmp_path / "cat.safetensors"
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))}, embedding)
    with tracing(store=store) as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(sd15(models_dir), token="hf_secret")
        pipe.load_textual_inversion(str(embedding), token="<cat>")
    recipe = recorded.recipe(pipe.tokenizer)
    assert "hf_secret" not in recipe.to_json()
    assert dict(recipe.steps[1].kwargs) == {"token": "<cat>"}
    assert recipe.steps[1].file.name == "cat.safetensors" and recipe.steps[1].file.folder is None
    in_store = store_resolver(store)

    def resolve(ref: FileRef) -> Path:
        return embedding if ref.sha256 == recipe.steps[1].file.sha256 else in_store(ref)

    tokenizer = build(recipe, resolve)
    assert tokenizer("a <cat>").input_ids == pipe.tokenizer("a <cat>").input_ids
    encoder = build(recorded.recipe(pipe.text_encoder), resolve)
    assert torch.equal(encoder.get_input_embeddings().weight, pipe.text_encoder.get_input_embeddings().weight)
