"""Workflows as the ComfyUI editor saves them, run by ``diffsplit run``, equal to their API twins.

Each UI document here is built to mean exactly what an API-format twin means;
the test runs both through the CLI and compares pixels, and compares the API form
that the UI run embedded in its PNG with the twin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsplit.engine.example_workflows import sdxl_refiner_workflow

from .conftest import UiGraph, png_pixels, png_text, write_json

MUTED = 2
BYPASSED = 4


def sdxl_refiner_ui() -> dict[str, Any]:
    """The editor's form of ``example_workflows.sdxl_refiner_workflow``, with the editor's extras.

    A PrimitiveNode (12) feeds ``steps`` of both KSamplerAdvanced nodes (their own
    stale widget value, 30, must lose to the link); a Reroute (13) sits between the
    base VAE and VAEDecode; a Note, a MarkdownNote and a group are decoration.
    """
    ui = UiGraph()
    ui.node(1, "CheckpointLoaderSimple", ["tiny-sdxl.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    ui.node(2, "CheckpointLoaderSimple", ["tiny-sdxl-refiner.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    sdxl_sizes = [1024, 1024, 0, 0, 1024, 1024]
    ui.node(
        3,
        "CLIPTextEncodeSDXL",
        [*sdxl_sizes, "a castle", "a castle"],
        inputs={"clip": "CLIP"},
        outputs=["CONDITIONING"],
    )
    ui.node(4, "CLIPTextEncodeSDXL", [*sdxl_sizes, "", ""], inputs={"clip": "CLIP"}, outputs=["CONDITIONING"])
    ui.node(
        5,
        "CLIPTextEncodeSDXLRefiner",
        [6.0, 1024, 1024, "a castle"],
        inputs={"clip": "CLIP"},
        outputs=["CONDITIONING"],
    )
    ui.node(
        6,
        "CLIPTextEncodeSDXLRefiner",
        [2.5, 1024, 1024, ""],
        inputs={"clip": "CLIP"},
        outputs=["CONDITIONING"],
    )
    ui.node(7, "EmptyLatentImage", [64, 64, 1], outputs=["LATENT"])
    sampler_inputs = {
        "model": "MODEL",
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "latent_image": "LATENT",
    }
    ui.node(
        8,
        "KSamplerAdvanced",
        ["enable", 11, "fixed", 30, 5.0, "euler", "normal", 0, 4, "enable"],
        inputs=sampler_inputs,
        converted={"steps": "INT"},
        outputs=["LATENT"],
    )
    ui.node(
        9,
        "KSamplerAdvanced",
        ["disable", 11, "fixed", 30, 5.0, "euler", "normal", 4, 10000, "disable"],
        inputs=sampler_inputs,
        converted={"steps": "INT"},
        outputs=["LATENT"],
    )
    ui.node(10, "VAEDecode", inputs={"samples": "LATENT", "vae": "VAE"}, outputs=["IMAGE"])
    ui.node(11, "SaveImage", ["sdxl"], inputs={"images": "IMAGE"})
    ui.primitive(12, "INT", 6, widget_name="steps")
    ui.reroute(13, "VAE")
    ui.node(14, "Note", ["base for 4 of 6 steps, then the refiner"], properties={"text": ""})
    ui.node(15, "MarkdownNote", ["## Refiner\nhands off at step **4**"])
    ui.group("Base", [0, 0, 800, 600])
    ui.group("Refiner", [0, 650, 800, 600])

    for encoder in (3, 4):
        ui.connect(1, 1, encoder, "clip")
    for encoder in (5, 6):
        ui.connect(2, 1, encoder, "clip")
    for sampler, model, positive, negative, latent in ((8, 1, 3, 4, 7), (9, 2, 5, 6, 8)):
        ui.connect(model, 0, sampler, "model")
        ui.connect(positive, 0, sampler, "positive")
        ui.connect(negative, 0, sampler, "negative")
        ui.connect(latent, 0, sampler, "latent_image")
        ui.connect(12, 0, sampler, "steps")
    ui.connect(9, 0, 10, "samples")
    ui.connect(1, 2, 13, "")
    ui.connect(13, 0, 10, "vae")
    ui.connect(10, 0, 11, "images")
    return ui.document()


def sd15_lora_controlnet_api() -> dict[str, Any]:
    """SD 1.5 through a LoRA, a ControlNet (advanced apply) from ``edges.png``, 3 steps."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "tiny-sd15-lora.safetensors",
                "strength_model": 0.7,
                "strength_clip": 0.5,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 123,
                "steps": 3,
                "cfg": 6.0,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "positive": ["12", 0],
                "negative": ["12", 1],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "fox"}},
        "9": {
            "class_type": "ControlNetLoader",
            "inputs": {"control_net_name": "tiny-sd15-controlnet.safetensors"},
        },
        "10": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
        "12": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["3", 0],
                "negative": ["4", 0],
                "control_net": ["9", 0],
                "image": ["10", 0],
                "strength": 0.9,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
    }


def sd15_lora_controlnet_ui() -> dict[str, Any]:
    """The editor's form of ``sd15_lora_controlnet_api`` plus a bypassed and a muted node.

    Bypassed: ImageInvert (11) between LoadImage and the ControlNet apply, so the
    hint passes through uninverted. Muted: a PreviewImage (13) of the decoded image,
    which must not run. The KSampler's seed widget says "randomize"; the stored value is used.
    """
    ui = UiGraph()
    ui.node(1, "CheckpointLoaderSimple", ["tiny-sd15.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    ui.node(
        2,
        "LoraLoader",
        ["tiny-sd15-lora.safetensors", 0.7, 0.5],
        inputs={"model": "MODEL", "clip": "CLIP"},
        outputs=["MODEL", "CLIP"],
    )
    ui.node(
        3,
        "CLIPTextEncode",
        ["a red fox"],
        inputs={"clip": "CLIP"},
        outputs=["CONDITIONING"],
        title="Positive",
    )
    ui.node(
        4, "CLIPTextEncode", ["blurry"], inputs={"clip": "CLIP"}, outputs=["CONDITIONING"], title="Negative"
    )
    ui.node(5, "EmptyLatentImage", [64, 64, 1], outputs=["LATENT"])
    ui.node(
        6,
        "KSampler",
        [123, "randomize", 3, 6.0, "dpmpp_2m", "karras", 1.0],
        inputs={
            "model": "MODEL",
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "latent_image": "LATENT",
        },
        outputs=["LATENT"],
    )
    ui.node(7, "VAEDecode", inputs={"samples": "LATENT", "vae": "VAE"}, outputs=["IMAGE"])
    ui.node(8, "SaveImage", ["fox"], inputs={"images": "IMAGE"})
    ui.node(9, "ControlNetLoader", ["tiny-sd15-controlnet.safetensors"], outputs=["CONTROL_NET"])
    ui.node(10, "LoadImage", ["edges.png", "image"], outputs=["IMAGE", "MASK"])
    ui.node(11, "ImageInvert", inputs={"image": "IMAGE"}, outputs=["IMAGE"], mode=BYPASSED)
    ui.node(
        12,
        "ControlNetApplyAdvanced",
        [0.9, 0.0, 1.0],
        inputs={
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "control_net": "CONTROL_NET",
            "image": "IMAGE",
            "vae": "VAE",
        },
        outputs=["CONDITIONING", "CONDITIONING"],
    )
    ui.node(13, "PreviewImage", inputs={"images": "IMAGE"}, mode=MUTED)
    ui.group("ControlNet", [0, 0, 600, 400])

    ui.connect(1, 0, 2, "model")
    ui.connect(1, 1, 2, "clip")
    ui.connect(2, 1, 3, "clip")
    ui.connect(2, 1, 4, "clip")
    ui.connect(2, 0, 6, "model")
    ui.connect(5, 0, 6, "latent_image")
    ui.connect(3, 0, 12, "positive")
    ui.connect(4, 0, 12, "negative")
    ui.connect(9, 0, 12, "control_net")
    ui.connect(10, 0, 11, "image")
    ui.connect(11, 0, 12, "image")
    ui.connect(12, 0, 6, "positive")
    ui.connect(12, 1, 6, "negative")
    ui.connect(6, 0, 7, "samples")
    ui.connect(1, 2, 7, "vae")
    ui.connect(7, 0, 8, "images")
    ui.connect(7, 0, 13, "images")
    return ui.document()


def run_both(run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path, ui: dict, api: dict):
    """Run the UI document and the API document through the CLI; their saved PNG paths."""
    saved = []
    for kind, document in (("ui", ui), ("api", api)):
        workflow = write_json(tmp_path / f"{kind}.json", document)
        result = run_cli(
            "run", workflow, "--models", models_dir, "--out", tmp_path / kind, "--inputs", inputs_dir, "-q"
        )
        assert result.exit_code == 0, result.stderr
        assert len(result.saved) == 1
        saved.append(result.saved[0])
    return saved


def without_titles(prompt: dict[str, Any]) -> dict[str, Any]:
    return {node_id: {k: v for k, v in entry.items() if k != "_meta"} for node_id, entry in prompt.items()}


def test_sdxl_base_refiner_ui_equals_its_api_twin(
    run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path
):
    ui_png, api_png = run_both(
        run_cli, tmp_path, models_dir, inputs_dir, sdxl_refiner_ui(), sdxl_refiner_workflow()
    )
    assert (png_pixels(ui_png) == png_pixels(api_png)).all()
    chunks = png_text(ui_png)
    assert json.loads(chunks["prompt"]) == sdxl_refiner_workflow()
    embedded_ui = json.loads(chunks["workflow"])  # the editor's form travels too, as ComfyUI does
    assert {node["type"] for node in embedded_ui["nodes"]} >= {"PrimitiveNode", "Reroute", "MarkdownNote"}
    assert "workflow" not in png_text(api_png)


def test_primitive_steps_drive_both_samplers(run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path):
    """Editing the PrimitiveNode's value is editing both samplers' steps (and nothing else)."""
    ui = sdxl_refiner_ui()
    primitive = next(node for node in ui["nodes"] if node["id"] == 12)
    primitive["widgets_values"][0] = 5
    api = sdxl_refiner_workflow()
    api["8"]["inputs"]["steps"] = api["9"]["inputs"]["steps"] = 5
    ui_png, api_png = run_both(run_cli, tmp_path, models_dir, inputs_dir, ui, api)
    assert json.loads(png_text(ui_png)["prompt"]) == api
    assert (png_pixels(ui_png) == png_pixels(api_png)).all()


def test_sd15_lora_controlnet_ui_with_bypassed_and_muted_nodes(
    run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path
) -> None:
    api = sd15_lora_controlnet_api()
    ui_png, api_png = run_both(run_cli, tmp_path, models_dir, inputs_dir, sd15_lora_controlnet_ui(), api)
    assert (png_pixels(ui_png) == png_pixels(api_png)).all()
    prompt = json.loads(png_text(ui_png)["prompt"])
    assert without_titles(prompt) == api  # neither the bypassed invert nor the muted preview is left
    assert prompt["3"]["_meta"] == {"title": "Positive"}
    assert not (tmp_path / "ui" / "temp").exists()  # the muted PreviewImage never ran


def test_bypass_is_not_the_same_as_running_the_node(
    run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path
) -> None:
    """With the ImageInvert enabled, the ControlNet sees the inverted hint: a different image."""
    ui = sd15_lora_controlnet_ui()
    next(node for node in ui["nodes"] if node["id"] == 11)["mode"] = 0
    bypassed = sd15_lora_controlnet_ui()
    enabled_png, bypassed_png = run_both(run_cli, tmp_path, models_dir, inputs_dir, ui, bypassed)
    assert json.loads(png_text(enabled_png)["prompt"])["12"]["inputs"]["image"] == ["11", 0]
    assert (png_pixels(enabled_png) != png_pixels(bypassed_png)).any()


def img2img_inpaint_api() -> dict[str, Any]:
    """Two branches on SD 1.5: img2img of photo.png at denoise 0.6, and inpainting masked.png's hole."""
    sampler = {
        "model": ["1", 0],
        "seed": 9,
        "steps": 2,
        "cfg": 6.0,
        "sampler_name": "euler_ancestral",
        "scheduler": "normal",
        "positive": ["3", 0],
        "negative": ["4", 0],
    }
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lake at dawn", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["11", 0], "denoise": 0.6}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "img2img"}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "21": {
            "class_type": "VAEEncodeForInpaint",
            "inputs": {"pixels": ["20", 0], "vae": ["1", 2], "mask": ["20", 1], "grow_mask_by": 6},
        },
        "22": {"class_type": "KSampler", "inputs": {**sampler, "latent_image": ["21", 0], "denoise": 1.0}},
        "23": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["1", 2]}},
        "24": {"class_type": "SaveImage", "inputs": {"images": ["23", 0], "filename_prefix": "inpaint"}},
    }


def img2img_inpaint_ui() -> dict[str, Any]:
    """The editor's form of ``img2img_inpaint_api`` (LoadImage carries its upload widget value)."""
    ui = UiGraph()
    ui.node(1, "CheckpointLoaderSimple", ["tiny-sd15.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    ui.node(3, "CLIPTextEncode", ["a lake at dawn"], inputs={"clip": "CLIP"}, outputs=["CONDITIONING"])
    ui.node(4, "CLIPTextEncode", [""], inputs={"clip": "CLIP"}, outputs=["CONDITIONING"])
    ui.connect(1, 1, 3, "clip")
    ui.connect(1, 1, 4, "clip")
    sampler_inputs = {
        "model": "MODEL",
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "latent_image": "LATENT",
    }
    for base, image, encoder, widgets, denoise, prefix in (
        (10, "photo.png", "VAEEncode", None, 0.6, "img2img"),
        (20, "masked.png", "VAEEncodeForInpaint", [6], 1.0, "inpaint"),
    ):
        ui.node(base, "LoadImage", [image, "image"], outputs=["IMAGE", "MASK"])
        encoder_inputs = {"pixels": "IMAGE", "vae": "VAE"}
        if encoder == "VAEEncodeForInpaint":
            encoder_inputs["mask"] = "MASK"
        ui.node(base + 1, encoder, widgets, inputs=encoder_inputs, outputs=["LATENT"])
        ui.node(
            base + 2,
            "KSampler",
            [9, "fixed", 2, 6.0, "euler_ancestral", "normal", denoise],
            inputs=sampler_inputs,
            outputs=["LATENT"],
        )
        ui.node(base + 3, "VAEDecode", inputs={"samples": "LATENT", "vae": "VAE"}, outputs=["IMAGE"])
        ui.node(base + 4, "SaveImage", [prefix], inputs={"images": "IMAGE"})
        ui.connect(base, 0, base + 1, "pixels")
        if encoder == "VAEEncodeForInpaint":
            ui.connect(base, 1, base + 1, "mask")
        ui.connect(1, 2, base + 1, "vae")
        ui.connect(1, 0, base + 2, "model")
        ui.connect(3, 0, base + 2, "positive")
        ui.connect(4, 0, base + 2, "negative")
        ui.connect(base + 1, 0, base + 2, "latent_image")
        ui.connect(base + 2, 0, base + 3, "samples")
        ui.connect(1, 2, base + 3, "vae")
        ui.connect(base + 3, 0, base + 4, "images")
    return ui.document()


def test_img2img_and_inpaint_ui_equal_their_api_twin(
    run_cli, tmp_path: Path, models_dir: Path, inputs_dir: Path
):
    results = {}
    for kind, document in (("ui", img2img_inpaint_ui()), ("api", img2img_inpaint_api())):
        workflow = write_json(tmp_path / f"{kind}.json", document)
        result = run_cli(
            "run", workflow, "--models", models_dir, "--out", tmp_path / kind, "--inputs", inputs_dir, "-q"
        )
        assert result.exit_code == 0, result.stderr
        results[kind] = sorted(result.saved)
    assert [path.name for path in results["ui"]] == ["img2img_00001_.png", "inpaint_00001_.png"]
    for ui_png, api_png in zip(results["ui"], results["api"], strict=True):
        assert (png_pixels(ui_png) == png_pixels(api_png)).all()
    assert json.loads(png_text(results["ui"][0])["prompt"]) == img2img_inpaint_api()


def test_bypassed_lora_loader_passes_model_and_clip_through(run_workflow) -> None:
    """Bypassing a two-output node: MODEL consumers get its MODEL input, CLIP consumers its CLIP input."""
    ui = sd15_lora_controlnet_ui()
    next(node for node in ui["nodes"] if node["id"] == 2)["mode"] = BYPASSED
    api = sd15_lora_controlnet_api()
    del api["2"]
    api["6"]["inputs"]["model"] = ["1", 0]
    api["3"]["inputs"]["clip"] = api["4"]["inputs"]["clip"] = ["1", 1]
    from_ui, from_api = run_workflow(ui), run_workflow(api)
    assert "2" not in from_ui.outputs
    assert (from_ui.outputs["7"][0] == from_api.outputs["7"][0]).all()
