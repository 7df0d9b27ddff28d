"""Per-node measurements of real tiny workflows: times, memory, bytes by category, naive weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import controlnet_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.profiles.measure import measure_workflow
from diffsplit.profiles.model import WorkflowMeasure
from diffsplit.profiles.weights import naive_weight_files


def test_every_node_of_sd15_is_measured_with_sane_numbers(sd15_measure: WorkflowMeasure) -> None:
    ids = [node.node_id for node in sd15_measure.nodes]
    assert ids == ["1", "2", "3", "4", "5", "6", "7", "8"]
    for node in sd15_measure.nodes:
        assert node.wall_s >= 0 and node.cpu_s >= 0
        assert not node.cache_hit
        assert node.memory.kind == "rss"
        assert node.memory.peak_bytes > 10 << 20, "a process running torch holds more than 10 MB"
    assert sd15_measure.total_s >= sum(node.wall_s for node in sd15_measure.nodes)
    assert sd15_measure.overhead_s >= 0
    sampler = sd15_measure.node("6")
    assert sampler.wall_s == max(node.wall_s for node in sd15_measure.nodes if node.role == "compute")


def test_sampler_inputs_are_categorized_and_the_empty_latent_travels_as_zeros(
    sd15_measure: WorkflowMeasure,
) -> None:
    sampler = sd15_measure.node("6")
    inputs = {item.name: item for item in sampler.inputs}
    assert inputs["model"].category == "model" and inputs["model"].source == "2"
    assert 0 < inputs["model"].payload_bytes < 4096, "a recipe, never weights"
    assert inputs["positive"].category == "intermediate" and inputs["positive"].digest is not None
    assert inputs["seed"].category == "normal" and inputs["cfg"].category == "normal"
    latent = inputs["latent_image"]
    assert latent.category == "intermediate" and latent.source == "5"
    assert latent.zeros, "EmptyLatentImage gives zeros, sent as shape only"
    assert latent.payload_bytes == 4 * 8 * 8 * 4, "raw bytes of a [1, 4, 8, 8] float32 latent"
    assert latent.wire_bytes < 100
    totals = sampler.bytes_by_category()
    tensors = [i.payload_bytes for i in sampler.inputs if i.category == "intermediate"]
    assert totals["intermediate"] == sum(tensors)
    assert sampler.request_bytes > inputs["positive"].wire_bytes + inputs["negative"].wire_bytes
    assert sampler.reply_bytes > latent.payload_bytes, "the sampled latent is not zeros: it travels back"


def test_decoder_latent_is_sent_in_full_and_its_image_comes_back(sd15_measure: WorkflowMeasure) -> None:
    decoder = sd15_measure.node("7")
    samples = next(i for i in decoder.inputs if i.name == "samples")
    assert not samples.zeros and samples.wire_bytes >= samples.payload_bytes
    assert decoder.reply_bytes >= 64 * 64 * 3 * 4, "a 64x64 RGB float32 image"


def test_naive_weights_are_the_checkpoint_and_lora_files(
    sd15_measure: WorkflowMeasure, models_dir: Path,
) -> None:
    checkpoint = (models_dir / "checkpoints" / "tiny-sd15.safetensors").stat().st_size
    lora = (models_dir / "loras" / "tiny-sd15-lora.safetensors").stat().st_size
    sampler = sd15_measure.node("6")
    assert sampler.weight_bytes == checkpoint + lora
    assert sampler.weight_files == ("checkpoints/tiny-sd15.safetensors", "loras/tiny-sd15-lora.safetensors")
    assert sd15_measure.node("7").weight_bytes == checkpoint, "the VAE comes from the checkpoint, no LoRA"
    assert sd15_measure.node("5").weight_bytes == 0


def test_loaders_and_outputs_are_not_offloadable(sd15_measure: WorkflowMeasure) -> None:
    assert sd15_measure.node("1").offload_block.startswith("loader")
    assert sd15_measure.node("2").offload_block.startswith("loader")
    assert sd15_measure.node("8").offload_block.startswith("output node")
    assert sd15_measure.candidates == ("3", "4", "5", "6", "7")


def test_controlnet_workflow_blocks_file_readers_and_model_returning_nodes(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, models_dir: Path, tmp_path: Path,
) -> None:
    workflow = load_workflow(controlnet_workflow(), registry)
    recipes = output_recipe_source(workflow, registry, store)
    measure = measure_workflow(workflow, registry, store, recipes, name="cn", output_dir=tmp_path,
                               inputs_dir=inputs_dir, warmup_runs=0)
    assert "edges.png" in measure.node("10").offload_block, "LoadImage reads a local file"
    assert "holds a model" in measure.node("11").offload_block, "ControlNetApply returns a hint with a model"
    sampler = measure.node("6")
    controlnet = (models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors").stat().st_size
    checkpoint = (models_dir / "checkpoints" / "tiny-sd15.safetensors").stat().st_size
    assert sampler.weight_bytes == checkpoint + controlnet, "the conditioning's hint needs the ControlNet"
    assert sampler.offloadable


@pytest.mark.parametrize("node_id", ["3", "6"])
def test_weight_walk_without_a_store_names_files_with_unknown_size(
    registry: NodeRegistry, node_id: str
) -> None:
    from diffsplit.engine.example_workflows import sd15_workflow

    workflow = load_workflow(sd15_workflow(), registry)
    files = naive_weight_files(workflow, registry, None, node_id)
    assert "loras/tiny-sd15-lora.safetensors" in files.files and files.total_bytes == 0
