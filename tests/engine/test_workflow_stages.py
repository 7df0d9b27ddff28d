"""Cutting a workflow around its sampling nodes (``diffsplit batch --ray``)."""

from __future__ import annotations

import pytest
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.example_workflows import sd15_workflow, sdxl_refiner_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.workflow_stages import Crossing, given_outputs, sampler_nodes, split_stages


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry()


def test_sd15_cuts_around_its_ksampler(registry: NodeRegistry) -> None:
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    assert sampler_nodes(workflow, registry) == ("6",)
    split = split_stages(workflow, registry, ["6"])
    assert split.sampling == ("6",)
    assert set(split.feeds) == {Crossing("1", 0), Crossing("3", 0), Crossing("4", 0), Crossing("5", 0)}
    assert split.returns == (Crossing("6", 0),)


def test_a_node_between_two_samplers_joins_the_sampling_stage(registry: NodeRegistry) -> None:
    document = sdxl_refiner_workflow()
    document["12"] = {"class_type": "LatentUpscaleBy",
                      "inputs": {"samples": ["8", 0], "upscale_method": "nearest-exact", "scale_by": 1.0}}
    document["9"]["inputs"]["latent_image"] = ["12", 0]
    workflow = load_workflow(document, registry)
    assert sampler_nodes(workflow, registry) == ("8", "9")
    split = split_stages(workflow, registry, ["8", "9"])
    assert split.sampling == ("8", "12", "9")
    assert split.returns == (Crossing("9", 0),)
    assert Crossing("2", 0) in split.feeds and Crossing("8", 0) not in split.feeds


@pytest.mark.parametrize(("sampling", "message"), [
    ([], "no sampling node"),
    (["8"], "output node"),
    (["99"], "no node with id '99'"),
])
def test_cuts_that_cannot_work_are_refused_by_name(registry: NodeRegistry, sampling: list[str],
                                                   message: str) -> None:
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    with pytest.raises(WorkflowError, match=message):
        split_stages(workflow, registry, sampling)


def test_sampling_nodes_whose_outputs_nothing_reads_are_refused(registry: NodeRegistry) -> None:
    document = sd15_workflow(lora=False)
    document["7"]["inputs"]["samples"] = ["5", 0]  # the image decodes the empty latent: 6 leads nowhere
    workflow = load_workflow(document, registry)
    with pytest.raises(WorkflowError, match="nothing reads the sampling nodes' outputs"):
        split_stages(workflow, registry, ["6"])
    assert split_stages(workflow, registry, ["6", "7"]).returns == (Crossing("7", 0),)


def test_given_outputs_fill_only_what_is_read(registry: NodeRegistry) -> None:
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    given = given_outputs(workflow, registry, [Crossing("1", 0)], {"1:0": "model"})
    assert given == {"1": ("model", None, None)}
    with pytest.raises(WorkflowError, match="no value for 1:2"):
        given_outputs(workflow, registry, [Crossing("1", 2)], {})


def test_a_model_coming_back_from_the_sampling_stage_is_refused_before_anything_runs(
    registry: NodeRegistry,
) -> None:
    workflow = load_workflow(sd15_workflow(lora=True), registry)
    with pytest.raises(WorkflowError, match=r"its (MODEL|CLIP) output is read by a later node") as raised:
        split_stages(workflow, registry, ["2"])  # the LoraLoader: its MODEL and CLIP would have to come back
    assert raised.value.node_id == "2"
