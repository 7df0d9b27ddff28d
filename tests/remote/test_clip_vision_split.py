"""CLIP vision and unCLIP split between this process and a worker: the same bits as all-local."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.types import ClipVision
from diffsplit.engine.wire_values import from_wire, is_model_value, to_wire
from diffsplit.transport.envelope import decode, encode
from PIL import Image

from .test_split_runs import assert_same_outputs, run_workflow

RECIPE = {"v": 1, "steps": [], "select": "", "fingerprint": "f"}
VISION_OUTPUT_KEYS = ("image_embeds", "last_hidden_state", "penultimate_hidden_states")


def revision_workflow() -> dict[str, Any]:
    """SDXL revision as in ComfyUI's example: two images, two unCLIPConditioning on the text prompt."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-clip-vision.safetensors"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "mountains.png"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "sunset.png"}},
        "5": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["2", 0], "image": ["3", 0],
                                                           "crop": "center"}},
        "6": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["2", 0], "image": ["4", 0],
                                                           "crop": "none"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "anime", "clip": ["1", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["1", 1]}},
        "9": {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": ["7", 0], "clip_vision_output": ["5", 0], "strength": 0.75,
            "noise_augmentation": 0.0}},
        "10": {"class_type": "unCLIPConditioning", "inputs": {
            "conditioning": ["9", 0], "clip_vision_output": ["6", 0], "strength": 0.75,
            "noise_augmentation": 0.2}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["10", 0], "negative": ["8", 0], "latent_image": ["11", 0],
            "seed": 5, "steps": 3, "cfg": 6.0, "sampler_name": "dpmpp_3m_sde_gpu", "scheduler": "exponential",
            "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "revision"}},
    }  # fmt: skip


def _inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 80), indexing="ij")
    for name, picture in (("mountains.png", torch.stack([rows, cols, rows * cols], -1)),
                          ("sunset.png", torch.stack([cols, 1 - rows, rows], -1))):
        Image.fromarray((picture * 255).round().byte().numpy()).save(folder / name)
    return folder


def test_revision_with_sampler_and_clip_vision_encode_on_the_worker_equals_local(
    worker_address: str, models_dir: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    document = revision_workflow()
    inputs = _inputs(tmp_path / "input")
    local, _ = run_workflow(document, models_dir, tmp_path / "local", inputs, registry)
    remote = [f"{where}={worker_address}" for where in ("KSampler", "CLIPVisionEncode", "10")]
    split, runner = run_workflow(document, models_dir, tmp_path / "split", inputs, registry, remote=remote)
    assert set(runner.stats) == {"5", "6", "10", "12"}
    for node_id in ("5", "6"):
        (here,), (there,) = local.outputs[node_id], split.outputs[node_id]
        assert here.keys() == there.keys() == set(VISION_OUTPUT_KEYS)
        assert all(torch.equal(here[key], there[key]) for key in here)
    assert_same_outputs(local, split, ["12", "13"])
    # the CLIP vision model travelled as its recipe, a few hundred bytes, never as weights
    assert 0 < runner.stats["5"].recipe_bytes < 4096
    assert runner.stats["5"].request_tensor_bytes < 100_000


def test_vision_outputs_and_unclip_conditioning_cross_the_wire_as_equal_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = dict(zip(VISION_OUTPUT_KEYS, ((2, 128), (2, 50, 64), (2, 50, 64)), strict=True))
    output = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    item = {"clip_vision_output": output, "strength": 0.75, "noise_augmentation": 0.1}
    conditioning = [[torch.randn(1, 77, 192, generator=generator), {"unclip_conditioning": [item]}],
                    [torch.randn(1, 77, 192, generator=generator), {"unclip_conditioning": [item, item]}]]
    values = {"clip_vision_output": output, "positive": conditioning}
    wire = {name: to_wire(value, lambda _model: RECIPE, where=name) for name, value in values.items()}
    received = decode(encode({"inputs": wire}))["inputs"]
    back = {name: from_wire(value, lambda _recipe: None) for name, value in received.items()}
    assert all(torch.equal(back["clip_vision_output"][k], output[k]) for k in output)
    entries = back["positive"]
    for (cond, extras), (sent_cond, sent_extras) in zip(entries, conditioning, strict=True):
        assert torch.equal(cond, sent_cond)
        assert len(extras["unclip_conditioning"]) == len(sent_extras["unclip_conditioning"])
        for got in extras["unclip_conditioning"]:
            assert (got["strength"], got["noise_augmentation"]) == (0.75, 0.1)
            assert all(torch.equal(got["clip_vision_output"][k], output[k]) for k in output)
    # one tensor referenced several times travels once and comes back as one object
    items = [got for _, extras in entries for got in extras["unclip_conditioning"]]
    embeds = [got["clip_vision_output"]["image_embeds"] for got in items]
    assert all(tensor is embeds[0] for tensor in embeds)
    assert is_model_value(ClipVision(model=torch.nn.Identity()))
