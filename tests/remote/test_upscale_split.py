"""Upscale models and tiled VAE nodes on a real worker give the same pixels as a local run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.models.tiny_upscale import TINY_ESRGAN_FILE
from diffsplit.engine.nodes.registry import NodeRegistry

from .test_split_runs import assert_same_outputs, run_workflow

OFFLOADED = ("VAEDecodeTiled", "ImageUpscaleWithModel", "VAEEncodeTiled")


def upscale_workflow() -> dict[str, Any]:
    """SD 1.5 (64 px) → VAEDecodeTiled (several tiles) → the tiny 2x ESRGAN → VAEEncodeTiled → VAEDecode."""
    workflow = sd15_workflow(lora=False, seed=3, steps=2)
    workflow["7"] = {"class_type": "VAEDecodeTiled", "inputs": {
        "samples": ["6", 0], "vae": ["1", 2], "tile_size": 64, "overlap": 32,
        "temporal_size": 64, "temporal_overlap": 8}}
    workflow["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": TINY_ESRGAN_FILE}}
    workflow["21"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["20", 0],
                                                                        "image": ["7", 0]}}
    workflow["8"]["inputs"]["images"] = ["21", 0]
    workflow["22"] = {"class_type": "VAEEncodeTiled", "inputs": {
        "pixels": ["21", 0], "vae": ["1", 2], "tile_size": 64, "overlap": 0,
        "temporal_size": 64, "temporal_overlap": 8}}
    workflow["23"] = {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["1", 2]}}
    workflow["24"] = {"class_type": "SaveImage", "inputs": {"images": ["23", 0], "filename_prefix": "again"}}
    return workflow


def test_upscale_and_tiled_vae_nodes_on_a_worker_equal_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = upscale_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    assert local.outputs["7"][0].shape == (1, 64, 64, 3)
    assert local.outputs["21"][0].shape == (1, 128, 128, 3)
    assert local.outputs["22"][0]["samples"].shape == (1, 4, 16, 16)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"{cls}={worker_address}" for cls in OFFLOADED])
    assert_same_outputs(local, split, ["7", "21", "22", "23"])
    assert set(runner.stats) == {"7", "21", "22"}
    upscale = runner.stats["21"]
    # the upscale model travels as a recipe naming its file, never as weights
    assert 0 < upscale.recipe_bytes < 4096 and upscale.request_bytes < 100_000
