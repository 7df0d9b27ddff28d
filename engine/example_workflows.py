"""Example workflows in the API format, built in code, for the tiny model set.

Used by the demo, the tests and the benchmarks; each is a plain dict that
``engine.formats.load_workflow`` accepts. ``write_example_inputs`` writes the
images the ControlNet example loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image


def write_example_inputs(folder: Path) -> Path:
    """Write ``edges.png`` (a white bar on black, 64x64) into ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 8, 48, 56))
    image.save(folder / "edges.png")
    return folder


def sd15_workflow(*, seed: int = 7, steps: int = 4, lora: bool = True) -> dict[str, Any]:
    """SD 1.5 text-to-image, optionally through a LoRA."""
    model, clip = (["2", 0], ["2", 1]) if lora else (["1", 0], ["1", 1])
    workflow: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sd15"}},
    }
    if lora:
        workflow["2"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": "tiny-sd15-lora.safetensors",
            "strength_model": 0.8, "strength_clip": 0.8}}
    return workflow


def sdxl_refiner_workflow() -> dict[str, Any]:
    """SDXL base for the first steps, then the refiner finishes (KSamplerAdvanced hand-off)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "tiny-sdxl-refiner.safetensors"}},
        "3": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
            "target_width": 1024, "target_height": 1024, "text_g": "a castle", "text_l": "a castle"}},
        "4": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
            "target_width": 1024, "target_height": 1024, "text_g": "", "text_l": ""}},
        "5": {"class_type": "CLIPTextEncodeSDXLRefiner",
              "inputs": {"ascore": 6.0, "width": 1024, "height": 1024, "text": "a castle", "clip": ["2", 1]}},
        "6": {"class_type": "CLIPTextEncodeSDXLRefiner",
              "inputs": {"ascore": 2.5, "width": 1024, "height": 1024, "text": "", "clip": ["2", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": 11, "steps": 6, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": 4,
            "return_with_leftover_noise": "enable"}},
        "9": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["2", 0], "add_noise": "disable", "noise_seed": 11, "steps": 6, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["5", 0], "negative": ["6", 0],
            "latent_image": ["8", 0], "start_at_step": 4, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "sdxl"}},
    }


def controlnet_workflow() -> dict[str, Any]:
    """SD 1.5 with a ControlNet hint from an input image, a separate VAE and CLIP skip."""
    workflow = sd15_workflow(lora=False)
    workflow["9"] = {"class_type": "ControlNetLoader",
                     "inputs": {"control_net_name": "tiny-sd15-controlnet.safetensors"}}
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    workflow["11"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["3", 0], "control_net": ["9", 0], "image": ["10", 0], "strength": 0.9}}
    workflow["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-vae.safetensors"}}
    workflow["13"] = {"class_type": "CLIPSetLastLayer",
                      "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}}
    workflow["3"]["inputs"]["clip"] = ["13", 0]
    workflow["6"]["inputs"]["positive"] = ["11", 0]
    workflow["7"]["inputs"]["vae"] = ["12", 0]
    return workflow


def multi_condition_workflow(steps: int = 8) -> dict[str, Any]:
    """SD 1.5 steered by three ControlNet conditions on one input image: Canny edges at two
    threshold pairs (nodes 11 and 22: much the same edges) and a Depth Anything depth map, weakly
    (node 24, from the tiny set's ``preprocessors/tiny-depth-anything.safetensors``)."""
    workflow = controlnet_workflow()
    workflow["6"]["inputs"]["steps"] = steps
    workflow["20"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.2,
                                                        "high_threshold": 0.6}}
    workflow["21"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.25,
                                                        "high_threshold": 0.65}}
    workflow["11"]["inputs"].update(image=["20", 0], strength=0.8)
    workflow["22"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["11", 0], "control_net": ["9", 0], "image": ["21", 0], "strength": 0.7}}
    workflow["23"] = {"class_type": "DepthAnythingPreprocessor", "inputs": {
        "image": ["10", 0], "ckpt_name": "tiny-depth-anything.safetensors", "resolution": 64}}
    workflow["24"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["22", 0], "control_net": ["9", 0], "image": ["23", 0], "strength": 0.05}}
    workflow["6"]["inputs"]["positive"] = ["24", 0]
    return workflow


def two_branch_workflow() -> dict[str, Any]:
    """Two samplers with different seeds from the same prompt: independent branches."""
    workflow = sd15_workflow(seed=1)
    workflow["16"] = {"class_type": "KSampler", "inputs": {**workflow["6"]["inputs"], "seed": 2}}
    workflow["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}}
    workflow["18"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "b"}}
    return workflow


def separate_files_workflow(
    family: str, *, separate: bool = True, swap_clips: bool = False, weight_dtype: str = "default",
    seed: int = 7, steps: int = 3,
) -> dict[str, Any]:
    """Text-to-image from the tiny set's separate files (``family`` sd15 or sdxl), or from its checkpoint.

    ``separate``: UNETLoader + CLIPLoader (SD 1.5) / DualCLIPLoader (SDXL, CLIP-G first with
    ``swap_clips``) + VAELoader; else CheckpointLoaderSimple. Node ids match, so outputs compare.
    """
    if separate:
        clips = [f"tiny-{family}-clip-l.safetensors", f"tiny-{family}-clip-g.safetensors"]
        clip_loader = (
            {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny-clip-l.safetensors",
                                                    "type": "stable_diffusion"}}
            if family == "sd15" else
            {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": clips[swap_clips],
                                                        "clip_name2": clips[not swap_clips], "type": "sdxl"}}
        )  # fmt: skip
        loaders: dict[str, Any] = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"tiny-{family}-unet.safetensors",
                                                         "weight_dtype": weight_dtype}},
            "2": clip_loader,
            "9": {"class_type": "VAELoader", "inputs": {"vae_name": f"tiny-{family}-vae.safetensors"}},
        }  # fmt: skip
        model, clip, vae = ["1", 0], ["2", 0], ["9", 0]
    else:
        loaders = {"1": {"class_type": "CheckpointLoaderSimple",
                         "inputs": {"ckpt_name": f"tiny-{family}.safetensors"}}}  # fmt: skip
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    return {
        **loaders,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": vae}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": family}},
    }
