"""Split == local: workflows with some nodes on a real worker process give identical outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import (
    controlnet_workflow,
    sd15_workflow,
    sdxl_refiner_workflow,
    two_branch_workflow,
)
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.lazy_models import materialised
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source


def run_workflow(
    document: dict[str, Any], models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry,
    remote: list[str] = (), max_workers: int = 1,
) -> tuple[RunResult, RemoteRunner | None]:
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path / "out",
                        max_workers=max_workers)
    assigned = assign_remotes(workflow, registry, remote)
    if not assigned:
        return executor.run(workflow), None
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        return executor.run(workflow, node_runner=runner), runner


def assert_same_outputs(local: RunResult, split: RunResult, node_ids: list[str]) -> None:
    for node_id in node_ids:
        for a, b in zip(local.outputs[node_id], split.outputs[node_id], strict=True):
            _assert_same(a, b, f"node {node_id}")


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Equal tensors (dtype, shape, every bit) anywhere in two node values of the same shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs between split and local"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{index}]")


def test_sd15_lora_sampler_and_decode_on_worker_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sd15_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"KSampler={worker_address}", f"VAEDecode={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])
    stats = runner.stats
    assert set(stats) == {"6", "7"}
    sampler = stats["6"]
    # Weights never travel: the request is the recipes, the conditioning and a zeros latent.
    assert sampler.request_bytes < 200_000
    assert 0 < sampler.recipe_bytes < 4096 * 2
    assert sampler.cache_misses >= 1 or sampler.cache_hits >= 1


def test_sdxl_base_local_refiner_remote_hand_off_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sdxl_refiner_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"9={worker_address}"])
    assert_same_outputs(local, split, ["8", "9", "10"])
    assert set(runner.stats) == {"9"}


def test_controlnet_vae_override_and_clip_skip_on_worker_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = controlnet_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, _ = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                            remote=[f"KSampler={worker_address}", f"VAEDecode={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])


def test_two_branches_offloaded_concurrently_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = two_branch_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"KSampler={worker_address}"], max_workers=2)
    assert_same_outputs(local, split, ["6", "16", "7", "17"])
    assert set(runner.stats) == {"6", "16"}
    assert not torch.equal(split.outputs["7"][0], split.outputs["17"][0])


def test_conditioning_already_held_is_sent_as_digest(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    store = ModelStore(models_dir)
    workflow = load_workflow(sd15_workflow(), registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path, max_workers=1)
    assigned = assign_remotes(workflow, registry, [f"KSampler={worker_address}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        first = executor.run(workflow, node_runner=runner)
        first_stats = runner.stats["6"]
        again = executor.run(workflow.with_overrides({"6.seed": 99}, registry), node_runner=runner)
        second_stats = runner.stats["6"]
    assert first_stats.held_inputs == 0 and second_stats.held_inputs == 2
    assert second_stats.request_bytes < first_stats.request_bytes
    assert not torch.equal(first.outputs["6"][0]["samples"], again.outputs["6"][0]["samples"])


def advanced_controlnet_workflow(*, chain: bool) -> dict[str, Any]:
    """ControlNetApplyAdvanced: one hint shared by positive and negative (chained twice with ``chain``)."""
    workflow = controlnet_workflow()
    del workflow["11"]
    workflow["11"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "control_net": ["9", 0], "image": ["10", 0],
        "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}
    last = "11"
    if chain:
        workflow["14"] = {"class_type": "ImageInvert", "inputs": {"image": ["10", 0]}}
        workflow["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["11", 0], "negative": ["11", 1], "control_net": ["9", 0], "image": ["14", 0],
            "strength": 0.5, "start_percent": 0.1, "end_percent": 0.9}}
        last = "15"
    workflow["6"]["inputs"]["positive"] = [last, 0]
    workflow["6"]["inputs"]["negative"] = [last, 1]
    return workflow


@pytest.mark.parametrize("chain", [False, True], ids=["one-controlnet", "two-controlnets-chained"])
def test_shared_controlnet_hint_on_worker_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry,
    chain: bool,
) -> None:
    document = advanced_controlnet_workflow(chain=chain)
    assert document["4"]["class_type"] == "CLIPTextEncode"
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, _ = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                            remote=[f"KSampler={worker_address}", f"VAEDecode={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])


def test_canny_and_two_controlnets_on_worker_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = advanced_controlnet_workflow(chain=True)
    document["14"] = {"class_type": "Canny", "inputs": {
        "image": ["10", 0], "low_threshold": 0.2, "high_threshold": 0.6}}
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    assert float(local.outputs["14"][0].sum()) > 0  # the edges image has edges
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"KSampler={worker_address}", f"Canny={worker_address}"])
    assert_same_outputs(local, split, ["14", "6", "7"])
    assert set(runner.stats) == {"6", "14"}


def test_a_node_whose_output_holds_a_model_runs_on_the_worker(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    """ControlNetApplyAdvanced's conditioning holds the ControlNet: it comes back as the one loaded here."""
    document = advanced_controlnet_workflow(chain=True)
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"ControlNetApplyAdvanced={worker_address}"])
    assert set(runner.stats) == {"11", "15"}
    hint = split.outputs["15"][0][0][1]["control"]
    loaded = materialised(split.outputs["9"][0])  # the loader's output is a handle, built for the hint
    assert hint.controlnet is loaded and hint.previous.controlnet is loaded
    assert hint is split.outputs["15"][1][0][1]["control"]  # positive and negative share one hint
    assert_same_outputs(local, split, ["6", "7"])
