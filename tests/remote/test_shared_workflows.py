"""Real workflows people share, saved by the ComfyUI editor, run locally and split with identical pixels.

The corpus (``tests/data/shared_workflows``, see its SOURCES.md) is the
``workflow`` chunk of published example PNGs, byte for byte, and ``api/`` the
``prompt`` chunk the editor produced from each. Model names are pointed at the
tiny set and sizes scaled down; nothing else is changed. Every workflow of
the corpus runs (the CosXL edit one on tiny-sdxl's discrete schedule: EDM
v-prediction is not implemented).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.format_api import save_api_format
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from PIL import Image

from .test_split_runs import assert_same_outputs
from .test_split_runs import run_workflow as run_document

CORPUS = Path(__file__).parents[1] / "data" / "shared_workflows"
RUNS = (
    "sd15_area_composition", "sd15_controlnet_pose_2pass_hires", "sd15_esrgan_upscale", "sd15_gligen_textbox",
    "sd15_img2img", "sd15_inpaint_anythingv3", "sd15_lora_multiple", "sd21_txt2img_embedding",
    "sdxl_base_refiner", "sdxl_cosxl_edit_groupnode", "sdxl_revision_clipvision", "sdxl_turbo_samplercustom",
)
#: Inputs an older editor did not save, which take their class defaults here (as a current editor fills them).
NEWER_WIDGETS = {("VAEEncodeForInpaint", "grow_mask_by"), ("SDTurboScheduler", "denoise"),
                 ("CLIPVisionEncode", "crop"), ("DualCFGGuider", "style")}
REMOTE_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "VAEDecode",
                  "ImageUpscaleWithModel", "CLIPVisionEncode")
#: Model-file inputs and the tiny file each points at.
TINY_FILES = {
    "lora_name": "tiny-sd15-lora.safetensors", "vae_name": "tiny-vae.safetensors",
    "control_net_name": "tiny-sd15-controlnet.safetensors", "model_name": "tiny-esrgan-x2.safetensors",
    "gligen_name": "tiny-sd15-gligen.safetensors", "clip_name": "tiny-clip-vision.safetensors",
}
SIZE_INPUTS = ("width", "height", "x", "y")


def _document(name: str) -> dict[str, Any]:
    return json.loads((CORPUS / f"{name}.json").read_text(encoding="utf-8"))


def test_the_corpus_is_what_its_sources_list() -> None:
    listed = (CORPUS / "SOURCES.md").read_text(encoding="utf-8")
    for name in RUNS:
        assert f"`{name}.json`" in listed


@pytest.mark.parametrize("name", RUNS)
def test_ui_files_convert_to_the_graph_the_editor_sent(name: str, registry: NodeRegistry) -> None:
    ours = save_api_format(load_workflow(_document(name), registry))
    theirs = json.loads((CORPUS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    assert set(ours) == set(theirs)
    for node_id, node in theirs.items():
        assert ours[node_id]["class_type"] == node["class_type"]
        # LoadImage's upload button: a widget of the editor, never an input of the node
        expected = {key: value for key, value in node["inputs"].items()
                    if key not in ("upload", "choose file to upload")}
        actual = {
            key: value for key, value in ours[node_id]["inputs"].items()
            if (node["class_type"], key) not in NEWER_WIDGETS or key in expected
        }
        assert actual == expected, node_id


def _tiny_name(class_type: str, key: str, value: str) -> str:
    if key == "ckpt_name":
        if "xl" not in value.lower():
            return "tiny-sd15.safetensors"
        return "tiny-sdxl-refiner.safetensors" if "refiner" in value else "tiny-sdxl.safetensors"
    return TINY_FILES[key]


def _on_tiny_models(workflow: Workflow) -> Workflow:
    """The workflow with model names on the tiny set, pixel sizes / 8 (multiples of 8) and at most 4 steps."""
    for node in list(workflow.nodes.values()):
        changes: dict[str, Any] = {}
        for key, value in node.literals.items():
            if key == "ckpt_name" or key in TINY_FILES:
                changes[key] = _tiny_name(node.class_type, key, value)
            elif key in SIZE_INPUTS and node.class_type in ("EmptyLatentImage", "LatentUpscale",
                                                              "ConditioningSetArea", "GLIGENTextBoxApply"):
                changes[key] = max(8 * round(value / 64), 0 if key in ("x", "y") else 8)
            elif key == "steps" and node.class_type == "KSampler":
                changes[key] = min(value, 4)
        if changes:
            workflow = workflow.with_node(node.with_inputs(**changes))
    return workflow


def _input_images(folder: Path, workflow: Workflow) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for node in workflow.nodes.values():
        if node.class_type == "LoadImage":
            rows, cols = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
            rgba = torch.stack([rows, cols, rows * cols, (rows > 0.3).float()], dim=-1)
            picture = Image.fromarray((rgba * 255).round().byte().numpy(), mode="RGBA")
            picture.save(folder / node.inputs["image"])
    return folder


@pytest.mark.parametrize("name", RUNS)
def test_shared_workflows_run_split_with_the_same_pixels_as_local(
    name: str, worker_address: str, models_dir: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    workflow = _on_tiny_models(load_workflow(_document(name), registry))
    document = save_api_format(workflow)
    inputs = _input_images(tmp_path / "input", workflow)
    local, _ = run_document(document, models_dir, tmp_path / "local", inputs, registry)
    remote = [f"{cls}={worker_address}" for cls in REMOTE_CLASSES
              if any(node.class_type == cls for node in workflow.nodes.values())]
    split, runner = run_document(document, models_dir, tmp_path / "split", inputs, registry, remote=remote)
    offloaded = [node_id for node_id, node in workflow.nodes.items() if node.class_type in REMOTE_CLASSES]
    assert offloaded and set(runner.stats) == set(offloaded)
    assert_same_outputs(local, split, offloaded)
