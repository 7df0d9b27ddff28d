"""Tracing ComfyUI graphs: categories per input, loader chains, recipes, and refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import trace_workflow
from diffsplit.engine.types import DiffusionModel
from diffsplit.tracer.recipe import Recipe

from tests.tracer.conftest import graph_workflow


def nested(recipe: Recipe, name: str) -> Recipe:
    value = recipe.steps[0].kwargs[name]
    assert isinstance(value, Recipe)
    return value


def test_every_input_gets_a_category(graph_run: Any) -> None:
    sampler = graph_run.trace.node("11")
    categories = {item.name: item.category for item in sampler.inputs}
    assert categories == {
        "model": "model",
        "seed": "normal",
        "steps": "normal",
        "cfg": "normal",
        "sampler_name": "normal",
        "scheduler": "normal",
        "positive": "intermediate",
        "negative": "intermediate",
        "latent_image": "intermediate",
        "denoise": "normal",
    }
    assert all(item.offloadable for node in graph_run.trace.nodes for item in node.inputs)


def test_lora_recipe_carries_its_checkpoint(graph_run: Any, store: ModelStore) -> None:
    recipe = graph_run.trace.node("11").input("model").model.recipe
    assert recipe.select == "0"
    (step,) = recipe.steps
    assert (step.op, step.cls) == ("comfy.node", "LoraLoader")
    assert step.kwargs["strength_model"] == 0.8
    assert step.kwargs["lora_name"].name == "tiny-sd15-lora.safetensors"
    base = nested(recipe, "model")
    assert base.select == "0" and base.steps[0].cls == "CheckpointLoaderSimple"
    checkpoint = base.steps[0].kwargs["ckpt_name"]
    assert checkpoint.folder == "checkpoints"
    assert checkpoint.sha256 == store.sha256(store.resolve("checkpoints", "tiny-sd15.safetensors"))
    assert nested(recipe, "clip").select == "1"
    assert recipe.size_bytes() <= 4096


def test_vae_override_clip_skip_and_controlnet_recipes(graph_run: Any) -> None:
    traced = graph_run.trace
    override = traced.node("12").input("vae").model.recipe
    assert [(step.cls, step.kwargs["vae_name"].name) for step in override.steps] == [
        ("VAELoader", "tiny-vae.safetensors")
    ]
    checkpoint_vae = traced.node("8").input("vae").model.recipe
    assert checkpoint_vae.select == "2" and checkpoint_vae.steps[0].cls == "CheckpointLoaderSimple"
    clip = traced.node("4").input("clip").model.recipe
    assert clip.steps[0].cls == "CLIPSetLastLayer" and clip.steps[0].kwargs["stop_at_clip_layer"] == -2
    assert nested(clip, "clip").steps[0].cls == "LoraLoader"
    controlnet = traced.node("10").input("control_net").model.recipe
    assert controlnet.steps[0].cls == "ControlNetLoader"


def test_a_controlnet_inside_conditioning_is_explained(graph_run: Any) -> None:
    positive = graph_run.trace.node("11").input("positive")
    (embedded,) = positive.embedded
    assert embedded.path == "0.1.control.controlnet"
    assert embedded.recipe.digest() == graph_run.trace.node("10").input("control_net").model.recipe.digest()


def test_used_parts_name_the_modules_that_ran(graph_run: Any) -> None:
    traced = graph_run.trace
    assert traced.node("11").input("model").used == ("unet",)
    assert traced.node("4").input("clip").used == ("encoders.0",)
    assert traced.node("2").input("model").used == ()
    assert traced.node("11").input("model").parts["unet"].select == "0.unet"


def test_report_text_shows_loader_chains(graph_run: Any) -> None:
    text = graph_run.trace.report_text()
    assert (
        "KSampler.model ← LoraLoader(tiny-sd15-lora.safetensors, 0.8, 0.8) ← "
        "CheckpointLoaderSimple(tiny-sd15.safetensors sha256:"
    ) in text
    assert "CLIPTextEncode.clip ← CLIPSetLastLayer(-2) ← LoraLoader(" in text
    assert "VAEDecode.vae ← VAELoader(tiny-vae.safetensors sha256:" in text
    assert "KSampler.positive.0.1.control.controlnet ← ControlNetLoader(" in text
    json.dumps(graph_run.trace.to_dict())


def test_a_dry_trace_gives_the_same_recipes_without_running(
    graph_run: Any, registry: NodeRegistry, store: ModelStore
) -> None:
    dry = trace_workflow(graph_workflow(), registry, store, execute=False)
    executed = graph_run.trace.recipes()
    assert set(dry.recipes()) == set(executed)
    for key, recipe in dry.recipes().items():
        assert recipe.fingerprint is None
        assert recipe.digest() == executed[key].digest(), key
    assert dry.node("11").input("positive").category == "intermediate"
    assert not dry.executed and "dry" in dry.report_text()


def _custom_registry(base: NodeRegistry) -> NodeRegistry:
    def make_model(ctx: NodeContext) -> tuple[DiffusionModel]:
        return (DiffusionModel(unet=torch.nn.Conv2d(4, 4, 1), family="sd15"),)

    def edit_model(ctx: NodeContext, *, model: DiffusionModel) -> tuple[DiffusionModel]:
        with torch.no_grad():
            next(model.unet.parameters()).mul_(1.5)
        return (model,)

    def use_model(ctx: NodeContext, *, model: DiffusionModel) -> tuple[()]:
        return ()

    model_out = (OutputSpec("MODEL", "MODEL"),)
    return base.with_nodes(
        NodeClass("MakeModel", (), model_out, make_model),
        NodeClass("EditModel", (InputSpec("model", "MODEL"),), model_out, edit_model),
        NodeClass("UseModel", (InputSpec("model", "MODEL"),), (), use_model, output_node=True),
    )


def test_models_of_unknown_origin_or_edited_in_place_are_refused(
    registry: NodeRegistry, store: ModelStore
) -> None:
    custom = _custom_registry(registry)
    workflow = {
        "1": {"class_type": "MakeModel", "inputs": {}},
        "2": {"class_type": "UseModel", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "4": {"class_type": "EditModel", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "UseModel", "inputs": {"model": ["4", 0]}},
    }
    traced = trace_workflow(workflow, custom, store)
    refusals = traced.refusals()
    assert "no known loader produced it" in refusals["2.model"].reason
    assert "modified in place" in refusals["5.model"].reason
    assert "UseModel.model" in refusals["5.model"].obj_description
    dry = trace_workflow(workflow, custom, store, execute=False)
    assert "node 1 (MakeModel), which is not a loader node" in dry.refusals()["2.model"].reason
    assert "not offloadable" in traced.report_text()


def test_unknown_node_classes_are_rejected(registry: NodeRegistry, store: ModelStore) -> None:
    from diffsplit.engine.errors import WorkflowError

    with pytest.raises(WorkflowError, match="unknown node class"):
        trace_workflow({"1": {"class_type": "NoSuchNode", "inputs": {}}}, registry, store, execute=False)


def test_the_output_recipe_source_agrees_with_the_trace(
    graph_run: Any, registry: NodeRegistry, store: ModelStore
) -> None:
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.trace_workflow import output_recipe_source

    source = output_recipe_source(load_workflow(graph_workflow(), registry), registry, store)
    expected = graph_run.trace.node("11").input("model").model.recipe
    assert Recipe.from_dict(source("2", 0)).digest() == expected.digest()
    assert source("6", 0) is None  # EmptyLatentImage is not a loader
