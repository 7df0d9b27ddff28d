"""The custom-sampling family runs locally as KSampler does, and split == local on a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.nodes.registry import NodeRegistry

from .test_split_runs import assert_same_outputs, run_workflow


def custom_workflow(advanced: bool, scheduler_node: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sd15_workflow(lora=False)`` with KSampler replaced by SamplerCustom(Advanced) and its parts."""
    workflow = sd15_workflow(lora=False, seed=5, steps=4)
    ksampler = workflow.pop("6")["inputs"]
    workflow["30"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    workflow["31"] = scheduler_node or {"class_type": "BasicScheduler", "inputs": {
        "model": ["1", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    if advanced:
        workflow["32"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
        workflow["33"] = {"class_type": "CFGGuider", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": ksampler["cfg"]}}
        workflow["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["32", 0], "guider": ["33", 0], "sampler": ["30", 0], "sigmas": ["31", 0],
            "latent_image": ["5", 0]}}
    else:
        workflow["6"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": ksampler["cfg"],
            "positive": ["3", 0], "negative": ["4", 0], "sampler": ["30", 0], "sigmas": ["31", 0],
            "latent_image": ["5", 0]}}
    return workflow


def test_sampler_custom_with_basic_scheduler_equals_ksampler(
    models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    plain = sd15_workflow(lora=False, seed=5, steps=4)
    plain["6"]["inputs"]["sampler_name"] = "euler_ancestral"
    reference, _ = run_workflow(plain, models_dir, tmp_path / "k", inputs_dir, registry)
    for advanced in (False, True):
        custom, _ = run_workflow(custom_workflow(advanced), models_dir, tmp_path / str(advanced), inputs_dir,
                                 registry)
        assert torch.equal(custom.outputs["6"][0]["samples"], reference.outputs["6"][0]["samples"])
        # the last step lands on sigma 0, where the sample is the last prediction
        assert torch.allclose(custom.outputs["6"][1]["samples"], custom.outputs["6"][0]["samples"], atol=1e-4)


@pytest.mark.parametrize("advanced", [False, True], ids=["SamplerCustom", "SamplerCustomAdvanced"])
def test_custom_samplers_on_a_worker_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry,
    advanced: bool,
) -> None:
    turbo = {"class_type": "SDTurboScheduler", "inputs": {"model": ["1", 0], "steps": 2, "denoise": 1.0}}
    document = custom_workflow(advanced, turbo)
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"6={worker_address}", f"VAEDecode={worker_address}"])
    assert_same_outputs(local, split, ["6", "7"])
    assert set(runner.stats) == {"6", "7"}


def test_split_sigmas_halves_give_the_same_latent_as_one_run(
    models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = custom_workflow(advanced=True)
    document["30"]["inputs"]["sampler_name"] = "euler"
    whole, _ = run_workflow(document, models_dir, tmp_path / "whole", inputs_dir, registry)
    document["34"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["31", 0], "step": 2}}
    document["35"] = {"class_type": "DisableNoise", "inputs": {}}
    document["6"]["inputs"]["sigmas"] = ["34", 0]
    document["36"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["35", 0], "guider": ["33", 0], "sampler": ["30", 0], "sigmas": ["34", 1],
        "latent_image": ["6", 0]}}
    document["7"]["inputs"]["samples"] = ["36", 0]
    halves, _ = run_workflow(document, models_dir, tmp_path / "halves", inputs_dir, registry)
    assert torch.allclose(halves.outputs["36"][0]["samples"], whole.outputs["6"][0]["samples"], atol=1e-4)
    # halfway, the sample still holds noise: the denoised prediction differs from it
    first_half = halves.outputs["6"]
    assert not torch.allclose(first_half[0]["samples"], first_half[1]["samples"], atol=1e-2)


def test_sampler_custom_without_start_noise_still_seeds_an_sde_sampler_with_noise_seed(
    models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    """ComfyUI passes SamplerCustom's noise_seed to the sampler even with add_noise off."""
    results = []
    for seed in (5, 6, 5):
        document = custom_workflow(advanced=False)
        document["30"]["inputs"]["sampler_name"] = "euler_ancestral"
        document["6"]["inputs"].update(add_noise=False, noise_seed=seed)
        run, _ = run_workflow(document, models_dir, tmp_path / f"s{len(results)}", inputs_dir, registry)
        results.append(run.outputs["6"][0]["samples"])
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])
