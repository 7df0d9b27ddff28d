"""The shared CosXL-Edit workflow (a legacy group node) on the tiny 8-channel edit model, split == local.

The editor's file is used as published, except that the checkpoint is the tiny
InstructPix2Pix-style SD 1.5 model, the sampler runs 2 steps and the input
image is a small picture (not a multiple of 8, so InstructPixToPixConditioning
crops it). The group's inner SamplerCustomAdvanced (``37:8``) and the
VAEDecode run on the worker; the DualCFGGuider's guider, with the image latent
in its three conditionings, travels to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.format_api import save_api_format
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.tiny_ip2p import TINY_IP2P_FILE
from diffsplit.engine.nodes.registry import NodeRegistry
from PIL import Image

from .test_split_runs import assert_same_outputs, run_workflow

CORPUS = Path(__file__).parents[1] / "data" / "shared_workflows"


def _edit_workflow(registry: NodeRegistry) -> dict[str, Any]:
    document = json.loads((CORPUS / "sdxl_cosxl_edit_groupnode.json").read_text(encoding="utf-8"))
    workflow = load_workflow(document, registry)
    workflow = workflow.with_node(workflow.nodes["4"].with_inputs(ckpt_name=TINY_IP2P_FILE))
    workflow = workflow.with_node(workflow.nodes["37:3"].with_inputs(steps=2))
    return save_api_format(workflow)


def _picture(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 52), torch.linspace(0, 1, 60), indexing="ij")
    rgb = torch.stack([rows, cols, rows * cols], dim=-1)
    Image.fromarray((rgb * 255).round().byte().numpy(), mode="RGB").save(folder / "mountains.png")
    return folder


def test_group_node_edit_workflow_split_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    document = _edit_workflow(registry)
    inputs = _picture(tmp_path / "input")
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs, registry)
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs, registry,
                                 remote=[f"SamplerCustomAdvanced={worker_address}",
                                         f"VAEDecode={worker_address}"])
    assert runner is not None and set(runner.stats) == {"37:8", "8"}
    assert_same_outputs(local, split, ["37:8", "8"])
    assert local.outputs["37:8"][0]["samples"].shape == (1, 4, 6, 7)  # 52 x 60 cropped to 48 x 56


def test_the_edit_follows_the_input_image(models_dir: Path, tmp_path: Path, registry: NodeRegistry) -> None:
    document = _edit_workflow(registry)
    inputs = _picture(tmp_path / "input")
    first, _ = run_workflow(document, models_dir, tmp_path / "first", inputs, registry)
    Image.new("RGB", (60, 52), "white").save(inputs / "mountains.png")
    second, _ = run_workflow(document, models_dir, tmp_path / "second", inputs, registry)
    # the sampled latent starts from zeros either way: only the UNet's image latent tells them apart
    assert not torch.equal(first.outputs["37:8"][0]["samples"], second.outputs["37:8"][0]["samples"])
