"""GLIGEN split == local: conditioning with GLIGEN boxes crosses to a real worker, the model as its recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.models.tiny_gligen import TINY_GLIGEN_FILE
from diffsplit.engine.nodes.registry import NodeRegistry

from .test_split_runs import assert_same_outputs, run_workflow


def gligen_workflow() -> dict[str, Any]:
    """Tiny SD 1.5 with two chained GLIGEN boxes on the positive prompt (as ComfyUI's GLIGEN example)."""
    clip = ["4", 1]
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "10": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": TINY_GLIGEN_FILE}},
        "24": {"class_type": "CLIPTextEncode",
               "inputs": {"text": "snowy mountains, a bottle, sun", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": clip}},
        "21": {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["24", 0], "clip": clip, "gligen_textbox_model": ["10", 0],
            "text": "purple galaxy bottle", "width": 24, "height": 40, "x": 8, "y": 16}},
        "27": {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["21", 0], "clip": clip, "gligen_textbox_model": ["10", 0],
            "text": "sun", "width": 16, "height": 16, "x": 40, "y": 0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 3, "steps": 3, "cfg": 8.0, "sampler_name": "uni_pc_bh2",
            "scheduler": "normal", "denoise": 1.0, "positive": ["27", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "gligen/testing"}},
    }


def test_ksampler_with_gligen_boxes_on_the_worker_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, inputs_dir: Path, registry: NodeRegistry
) -> None:
    document = gligen_workflow()
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs_dir, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs_dir, registry,
                                 remote=[f"KSampler={worker_address}"])
    assert_same_outputs(local, split, ["3", "8"])
    assert set(runner.stats) == {"3"}
    assert runner.stats["3"].request_bytes < 200_000  # the GLIGEN weights (3.5 MB) never travel

    inputs = {**document["3"]["inputs"], "positive": ["24", 0]}
    plain = {**document, "3": {**document["3"], "inputs": inputs}}
    without, _ = run_workflow(plain, models_dir, tmp_path / "plain", inputs_dir, registry)
    # the worker really applied the boxes: without them the sample differs
    assert not torch.equal(without.outputs["3"][0]["samples"], split.outputs["3"][0]["samples"])
