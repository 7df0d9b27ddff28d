"""The genie sampler in a KSampler workflow: split on a worker equals local bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.models.tiny import TINY_GENIE_HEAD_FILE
from diffsplit.engine.nodes.registry import NodeRegistry

from .test_split_runs import assert_same_outputs, run_workflow


def test_genie_ksampler_on_a_worker_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sd15_workflow(lora=True, seed=9, steps=3)
    document["6"]["inputs"].update(sampler_name="genie", scheduler="karras")
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"6={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])
    assert runner is not None and set(runner.stats) == {"6"}
    euler = sd15_workflow(lora=True, seed=9, steps=3)
    euler["6"]["inputs"].update(sampler_name="euler", scheduler="karras")
    other, _ = run_workflow(euler, models_dir, tmp_path / "euler", inputs_dir, registry)
    assert not torch.equal(other.outputs["6"][0]["samples"], local.outputs["6"][0]["samples"])


def test_a_genie_head_travels_by_recipe_and_the_split_run_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = sd15_workflow(lora=True, seed=9, steps=3)
    sampler = document["6"]["inputs"]
    document["40"] = {"class_type": "GenieHeadLoader", "inputs": {
        "model": sampler["model"], "head_name": TINY_GENIE_HEAD_FILE}}
    sampler.update(model=["40", 0], sampler_name="genie_head", scheduler="karras")
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"6={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])
    assert runner is not None and set(runner.stats) == {"6"}
