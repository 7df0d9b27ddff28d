"""What whole workflows compute, on the tiny models: ComfyUI semantics checked on pixels and latents.

Runs go through the real executor (``run_workflow``), so node outputs (latents,
conditioning) can be inspected as well as the decoded images.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.tiny import TINY_GENIE_HEAD_FILE
from diffsplit.engine.sampling.samplers import SAMPLER_NAMES

from .conftest import HOLE, IMAGE_SIDE, png_pixels

Workflow = dict[str, Any]
DECODE = "7"
SAMPLER = "6"


def txt2img(*, seed: int = 7, steps: int = 2, lora: bool = True) -> Workflow:
    return sd15_workflow(seed=seed, steps=steps, lora=lora)


def with_lora_strength(strength: float) -> Workflow:
    workflow = txt2img()
    workflow["2"]["inputs"].update(strength_model=strength, strength_clip=strength)
    return workflow


def from_image(workflow: Workflow, image: str = "photo.png") -> Workflow:
    """Sample from ``image`` (LoadImage 20 → VAEEncode 21) instead of an empty latent."""
    workflow["20"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    workflow["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["1", 2]}}
    workflow[SAMPLER]["inputs"]["latent_image"] = ["21", 0]
    return workflow


def inpaint_for_inpaint(sampler_name: str) -> Workflow:
    """masked.png → VAEEncodeForInpaint (mask = 1 - alpha, not grown) → KSampler at full denoise."""
    workflow = from_image(txt2img(lora=False), "masked.png")
    workflow["21"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["20", 0], "vae": ["1", 2], "mask": ["20", 1], "grow_mask_by": 0},
    }
    workflow[SAMPLER]["inputs"]["sampler_name"] = sampler_name
    return workflow


def inpaint_with_noise_mask() -> Workflow:
    """photo.png → VAEEncode → SetLatentNoiseMask (LoadImageMask alpha of masked.png) → KSampler 0.6."""
    workflow = from_image(txt2img(lora=False))
    workflow["22"] = {"class_type": "LoadImageMask", "inputs": {"image": "masked.png", "channel": "alpha"}}
    workflow["23"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["22", 0]}}
    workflow[SAMPLER]["inputs"].update(latent_image=["23", 0], denoise=0.6)
    return workflow


@pytest.fixture(scope="module")
def shared_cache() -> ExecutionCache:
    """Loader and text-encoder outputs reused across this module's sampler runs."""
    return ExecutionCache()


def sampled(run_workflow, workflow: Workflow, cache: ExecutionCache) -> torch.Tensor:
    """The KSampler's output latent (asked for as the target, so a cache hit still returns it)."""
    return run_workflow(workflow, cache=cache, targets=[SAMPLER]).outputs[SAMPLER][0]["samples"]


# -- LoRA, seeds ------------------------------------------------------------------------------------


def test_lora_strength_zero_is_no_lora_and_strength_changes_the_image(run_workflow) -> None:
    without = run_workflow(txt2img(lora=False)).outputs[DECODE][0]
    at_zero = run_workflow(with_lora_strength(0.0)).outputs[DECODE][0]
    at_point_eight = run_workflow(with_lora_strength(0.8)).outputs[DECODE][0]
    assert torch.equal(without, at_zero)
    assert (without - at_point_eight).abs().max() > 1e-3


def test_model_only_lora_changes_the_image_but_not_the_prompt(run_workflow) -> None:
    workflow = txt2img(lora=False)
    workflow["2"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": "tiny-sd15-lora.safetensors", "strength_model": 1.0},
    }
    workflow[SAMPLER]["inputs"]["model"] = ["2", 0]
    plain, patched = run_workflow(txt2img(lora=False)), run_workflow(workflow)
    assert torch.equal(plain.outputs["3"][0][0][0], patched.outputs["3"][0][0][0])
    assert not torch.equal(plain.outputs[DECODE][0], patched.outputs[DECODE][0])


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm"])
def test_same_seed_same_pixels_different_seed_different_pixels(run_workflow, sampler_name: str) -> None:
    """Also for samplers that draw fresh noise every step (their noise is seeded too)."""

    def run(seed: int):
        workflow = txt2img(seed=seed)
        workflow[SAMPLER]["inputs"]["sampler_name"] = sampler_name
        return run_workflow(workflow)

    first, second, other = run(5), run(5), run(6)
    assert torch.equal(first.outputs[DECODE][0], second.outputs[DECODE][0])
    assert (png_pixels(first.saved_files[0]) == png_pixels(second.saved_files[0])).all()
    assert not torch.equal(first.outputs[SAMPLER][0]["samples"], other.outputs[SAMPLER][0]["samples"])
    assert (png_pixels(first.saved_files[0]) != png_pixels(other.saved_files[0])).any()


def test_batch_items_get_different_noise(run_workflow) -> None:
    workflow = txt2img()
    workflow["5"]["inputs"]["batch_size"] = 2
    result = run_workflow(workflow)
    images = result.outputs[DECODE][0]
    assert images.shape == (2, IMAGE_SIDE, IMAGE_SIDE, 3) and len(result.saved_files) == 2
    assert not torch.equal(images[0], images[1])


# -- img2img and inpainting -------------------------------------------------------------------------


def test_img2img_half_denoise_stays_closer_to_the_input(run_workflow) -> None:
    distances = {}
    for denoise in (0.5, 1.0):
        workflow = from_image(txt2img(lora=False, steps=4))
        workflow[SAMPLER]["inputs"]["denoise"] = denoise
        outputs = run_workflow(workflow).outputs
        encoded, sampled = outputs["21"][0]["samples"], outputs[SAMPLER][0]["samples"]
        assert sampled.shape == encoded.shape == (1, 4, IMAGE_SIDE // 8, IMAGE_SIDE // 8)
        distances[denoise] = (sampled - encoded).square().mean().item()
    assert distances[0.5] < distances[1.0]


def latent_mask(noise_mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The noise mask at latent resolution, as ComfyUI resizes it (bilinear), ``[B, 1, h, w]``."""
    mask = noise_mask.reshape(-1, 1, *noise_mask.shape[-2:]).float()
    return torch.nn.functional.interpolate(mask, size=latent.shape[-2:], mode="bilinear")


def assert_only_the_hole_changed(before: dict[str, Any], after: dict[str, Any]) -> None:
    mask = latent_mask(before["noise_mask"], before["samples"]).expand_as(before["samples"])
    kept, painted = mask == 0, mask == 1
    assert kept.any() and painted.any()
    assert torch.allclose(after["samples"][kept], before["samples"][kept], atol=1e-4)
    assert (after["samples"][painted] - before["samples"][painted]).abs().max() > 0.1
    assert torch.equal(after["noise_mask"], before["noise_mask"])  # KSampler keeps the LATENT's mask


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "ddim"])
def test_inpaint_keeps_the_unmasked_latent(run_workflow, shared_cache: ExecutionCache, sampler_name: str):
    outputs = run_workflow(inpaint_for_inpaint(sampler_name), cache=shared_cache).outputs
    encoded = outputs["21"][0]
    hole = encoded["noise_mask"][0, 0]
    assert hole[HOLE, HOLE].eq(1).all() and hole.sum() == (HOLE.stop - HOLE.start) ** 2
    assert_only_the_hole_changed(encoded, outputs[SAMPLER][0])


def test_set_latent_noise_mask_inpaints_only_the_mask(run_workflow) -> None:
    outputs = run_workflow(inpaint_with_noise_mask()).outputs
    assert_only_the_hole_changed(outputs["23"][0], outputs[SAMPLER][0])


# -- many node kinds in one workflow ----------------------------------------------------------------


def kitchen_sink() -> Workflow:
    """Latent and image resizing, inversion, and conditioning combine/area/zero-out in one graph."""
    workflow = txt2img()
    workflow.update(
        {
            "20": {
                "class_type": "LatentUpscale",
                "inputs": {
                    "samples": ["5", 0],
                    "upscale_method": "nearest-exact",
                    "width": 128,
                    "height": 128,
                    "crop": "disabled",
                },
            },
            "21": {
                "class_type": "LatentUpscaleBy",
                "inputs": {"samples": ["20", 0], "upscale_method": "bilinear", "scale_by": 0.75},
            },
            "22": {
                "class_type": "ConditioningSetArea",
                "inputs": {
                    "conditioning": ["3", 0],
                    "width": 64,
                    "height": 72,
                    "x": 16,
                    "y": 8,
                    "strength": 1.0,
                },
            },
            "23": {
                "class_type": "ConditioningCombine",
                "inputs": {"conditioning_1": ["22", 0], "conditioning_2": ["3", 0]},
            },
            "24": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
            "25": {
                "class_type": "ImageScale",
                "inputs": {
                    "image": ["7", 0],
                    "upscale_method": "bilinear",
                    "width": 80,
                    "height": 64,
                    "crop": "center",
                },
            },
            "26": {
                "class_type": "ImageScaleBy",
                "inputs": {"image": ["25", 0], "upscale_method": "nearest-exact", "scale_by": 0.5},
            },
            "27": {"class_type": "ImageInvert", "inputs": {"image": ["26", 0]}},
            "28": {"class_type": "PreviewImage", "inputs": {"images": ["25", 0]}},
        }
    )
    workflow[SAMPLER]["inputs"].update(latent_image=["21", 0], positive=["23", 0], negative=["24", 0])
    workflow["8"]["inputs"]["images"] = ["27", 0]
    return workflow


def test_resizing_inverting_and_conditioning_nodes_run_together(run_workflow) -> None:
    result = run_workflow(kitchen_sink())
    outputs = result.outputs
    assert outputs["20"][0]["samples"].shape == (1, 4, 16, 16)
    assert outputs["21"][0]["samples"].shape == (1, 4, 12, 12)
    assert outputs[SAMPLER][0]["samples"].shape == (1, 4, 12, 12)
    assert outputs[DECODE][0].shape == (1, 96, 96, 3)
    assert outputs["25"][0].shape == (1, 64, 80, 3)
    assert outputs["26"][0].shape == (1, 32, 40, 3)
    assert torch.allclose(outputs["27"][0], 1.0 - outputs["26"][0])
    area_entry, plain_entry = outputs["23"][0]
    assert area_entry[1]["area"] == (
        72 // 8,
        64 // 8,
        8 // 8,
        16 // 8,
    )  # ComfyUI: (h, w, y, x) in latent cells
    assert "area" not in plain_entry[1]
    assert torch.equal(plain_entry[0], outputs["3"][0][0][0])
    zeroed = outputs["24"][0][0]
    assert not zeroed[0].any() and zeroed[0].shape == outputs["4"][0][0][0].shape
    assert all(not value.any() for value in zeroed[1].values() if isinstance(value, torch.Tensor))
    saved = sorted(path.name for path in result.saved_files)
    assert saved == ["ComfyUI_temp_00001_.png", "sd15_00001_.png"]
    assert png_pixels(next(p for p in result.saved_files if p.name.startswith("sd15"))).shape == (32, 40, 3)


# -- every sampler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_runs_with_karras(
    run_workflow, shared_cache: ExecutionCache, sampler_name: str
) -> None:
    workflow = txt2img()
    workflow[SAMPLER]["inputs"].update(sampler_name=sampler_name, scheduler="karras", steps=2)
    if sampler_name == "genie_head":  # the one sampler that needs a MODEL with a head
        inputs = workflow[SAMPLER]["inputs"]
        workflow["90"] = {"class_type": "GenieHeadLoader",
                          "inputs": {"model": inputs["model"], "head_name": TINY_GENIE_HEAD_FILE}}
        inputs["model"] = ["90", 0]
    result = run_workflow(workflow, cache=shared_cache)
    samples = result.outputs[SAMPLER][0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all() and samples.abs().max() > 0
    assert "6" in result.executed and len(result.saved_files) == 1
    image = result.outputs[DECODE][0]
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


# -- validation through the executor ----------------------------------------------------------------


def _edit(change) -> Workflow:
    workflow = copy.deepcopy(txt2img())
    change(workflow)
    return workflow


VALIDATION_CASES = {
    "unknown class": (
        lambda w: w[SAMPLER].update(class_type="KSamplr"),
        ("6", "KSamplr", None),
        "did you mean KSampler",
    ),
    "missing input": (lambda w: w[SAMPLER]["inputs"].pop("steps"), ("6", "KSampler", "steps"), "missing"),
    "unknown input": (
        lambda w: w["5"]["inputs"].update(depth=3),
        ("5", "EmptyLatentImage", "depth"),
        "depth",
    ),
    "wrong link type": (
        lambda w: w[SAMPLER]["inputs"].update(model=["1", 1]),
        ("6", "KSampler", "model"),
        "CLIP",
    ),
    "link to a missing node": (
        lambda w: w[DECODE]["inputs"].update(vae=["40", 0]),
        ("7", "VAEDecode", "vae"),
        "40",
    ),
    "link to a missing output": (
        lambda w: w[DECODE]["inputs"].update(vae=["1", 3]),
        ("7", "VAEDecode", "vae"),
        "3 output",
    ),
    "wrong value type": (lambda w: w[SAMPLER]["inputs"].update(cfg="high"), ("6", "KSampler", "cfg"), "high"),
    "value out of range": (
        lambda w: w["5"]["inputs"].update(width=8),
        ("5", "EmptyLatentImage", "width"),
        "minimum",
    ),
    "not a choice": (
        lambda w: w[SAMPLER]["inputs"].update(scheduler="cosine"),
        ("6", "KSampler", "scheduler"),
        "karras",
    ),
    "missing model file": (
        lambda w: w["2"]["inputs"].update(lora_name="style.safetensors"),
        ("2", "LoraLoader", "lora_name"),
        "tiny-sd15-lora.safetensors",
    ),
    "model name leaving the folder": (
        lambda w: w["1"]["inputs"].update(ckpt_name="../checkpoints/tiny-sd15.safetensors"),
        ("1", "CheckpointLoaderSimple", "ckpt_name"),
        "ckpt_name",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_errors_name_node_class_and_input(run_workflow, tmp_path, case: str) -> None:
    change, (node_id, class_type, input_name), detail = VALIDATION_CASES[case]
    with pytest.raises(WorkflowError) as caught:
        run_workflow(_edit(change))
    error = caught.value
    assert (error.node_id, error.class_type, error.input_name) == (node_id, class_type, input_name)
    assert f"node {node_id} ({class_type})" in str(error) and detail in str(error)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_cycle_is_reported_with_its_nodes(run_workflow) -> None:
    workflow = txt2img()
    workflow["16"] = {
        "class_type": "KSampler",
        "inputs": {**workflow[SAMPLER]["inputs"], "latent_image": [SAMPLER, 0]},
    }
    workflow[SAMPLER]["inputs"]["latent_image"] = ["16", 0]
    with pytest.raises(WorkflowError, match="cycle") as caught:
        run_workflow(workflow)
    assert "6" in str(caught.value) and "16" in str(caught.value)


# -- models shared between branches and runs ---------------------------------------------------------


def test_lora_does_not_leak_into_the_base_model(registry, store, inputs_dir, tmp_path) -> None:
    """A LoRA branch beside a plain branch, run concurrently, and a cached checkpoint reused after a LoRA."""

    def executor(workers: int) -> Executor:
        return Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path, max_workers=workers)

    plain = load_workflow(txt2img(seed=3, lora=False), registry)
    reference = executor(1).run(plain).outputs[DECODE][0]

    both = txt2img(seed=3)
    both["16"] = {"class_type": "KSampler", "inputs": {**both[SAMPLER]["inputs"], "model": ["1", 0]}}
    both["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 2]}}
    both["18"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "base"}}
    both["3"]["inputs"]["clip"] = both["4"]["inputs"]["clip"] = ["1", 1]  # prompts from the plain CLIP
    concurrent = executor(2).run(load_workflow(both, registry)).outputs
    assert torch.equal(concurrent["17"][0], reference)
    assert not torch.equal(concurrent[DECODE][0], reference)

    cache = ExecutionCache()
    warm = executor(1)
    warm.run(load_workflow(txt2img(seed=3), registry), cache=cache)
    again = warm.run(plain, cache=cache)
    assert again.timings["1"].cache_hit and "6" in again.executed  # the checkpoint the LoRA patched
    assert torch.equal(again.outputs[DECODE][0], reference)


def sdxl_with_lora(strength: float | None) -> Workflow:
    """SDXL base text-to-image with plain CLIPTextEncode prompts, through the SDXL LoRA unless None."""
    model, clip = (["1", 0], ["1", 1]) if strength is None else (["2", 0], ["2", 1])
    workflow: Workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle", "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        SAMPLER: {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 1,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": "sdxl"}},
    }
    if strength is not None:
        workflow["2"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "tiny-sdxl-lora.safetensors",
                "strength_model": strength,
                "strength_clip": strength,
            },
        }
    return workflow


def test_sdxl_lora_strength_zero_is_no_lora(run_workflow, shared_cache: ExecutionCache) -> None:
    without, at_zero, at_one = (
        run_workflow(sdxl_with_lora(strength), cache=shared_cache, targets=["3", DECODE]).outputs
        for strength in (None, 0.0, 1.0)
    )
    assert torch.equal(without[DECODE][0], at_zero[DECODE][0])
    assert not torch.equal(
        without["3"][0][0][0], at_one["3"][0][0][0]
    )  # the LoRA patches the text encoders too
    assert (without[DECODE][0] - at_one[DECODE][0]).abs().max() > 1e-3


# -- identities that hold in ComfyUI ----------------------------------------------------------------


def advanced(workflow: Workflow, node_id: str, **window: Any) -> None:
    """Replace KSampler ``node_id`` by a KSamplerAdvanced with the same settings and ``window``."""
    inputs = dict(workflow[node_id]["inputs"])
    inputs["noise_seed"] = inputs.pop("seed")
    inputs.pop("denoise")
    workflow[node_id] = {"class_type": "KSamplerAdvanced", "inputs": {**inputs, **window}}


def test_split_sampling_equals_one_sampler(run_workflow, shared_cache: ExecutionCache) -> None:
    """Steps 0-2 with leftover noise, then 2-end without adding noise, is the 4-step KSampler run."""
    whole = txt2img(steps=4)
    split = txt2img(steps=4)
    advanced(
        split,
        SAMPLER,
        add_noise="enable",
        start_at_step=0,
        end_at_step=2,
        return_with_leftover_noise="enable",
    )
    split["16"] = copy.deepcopy(split[SAMPLER])
    split["16"]["inputs"].update(
        add_noise="disable",
        start_at_step=2,
        end_at_step=10000,
        return_with_leftover_noise="disable",
        latent_image=[SAMPLER, 0],
    )
    split[DECODE]["inputs"]["samples"] = ["16", 0]
    one = sampled(run_workflow, whole, shared_cache)
    halves = run_workflow(split, cache=shared_cache, targets=[SAMPLER, "16"]).outputs
    assert torch.allclose(halves["16"][0]["samples"], one, atol=1e-5)
    assert not torch.allclose(halves[SAMPLER][0]["samples"], one, atol=1e-2)  # the first half is noisy


def test_full_window_advanced_sampler_equals_ksampler(run_workflow, shared_cache: ExecutionCache) -> None:
    full = txt2img(steps=2)
    advanced(
        full,
        SAMPLER,
        add_noise="enable",
        start_at_step=0,
        end_at_step=10000,
        return_with_leftover_noise="disable",
    )
    expected = sampled(run_workflow, txt2img(steps=2), shared_cache)
    assert torch.equal(sampled(run_workflow, full, shared_cache), expected)


def test_combining_a_prompt_with_itself_changes_nothing(run_workflow, shared_cache: ExecutionCache) -> None:
    """ComfyUI averages the predictions of equal, overlapping conditions."""
    doubled = txt2img()
    doubled["20"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["3", 0], "conditioning_2": ["3", 0]},
    }
    doubled[SAMPLER]["inputs"]["positive"] = ["20", 0]
    expected = sampled(run_workflow, txt2img(), shared_cache)
    assert torch.allclose(sampled(run_workflow, doubled, shared_cache), expected, atol=1e-5)


def test_clip_last_layer_minus_one_is_the_default(run_workflow, shared_cache: ExecutionCache) -> None:
    skipped = {}
    for layer in (-1, -2):
        workflow = txt2img(lora=False)
        workflow["13"] = {
            "class_type": "CLIPSetLastLayer",
            "inputs": {"clip": ["1", 1], "stop_at_clip_layer": layer},
        }
        workflow["3"]["inputs"]["clip"] = ["13", 0]
        skipped[layer] = run_workflow(workflow, cache=shared_cache, targets=["3"]).outputs["3"][0][0][0]
    default = run_workflow(txt2img(lora=False), cache=shared_cache, targets=["3"]).outputs["3"][0][0][0]
    assert torch.equal(skipped[-1], default)
    assert not torch.equal(skipped[-2], default)


@pytest.mark.parametrize("apply_class", ["ControlNetApply", "ControlNetApplyAdvanced"])
def test_controlnet_strength_zero_is_no_controlnet(run_workflow, shared_cache, apply_class: str) -> None:
    workflow = txt2img(lora=False)
    workflow["9"] = {
        "class_type": "ControlNetLoader",
        "inputs": {"control_net_name": "tiny-sd15-controlnet.safetensors"},
    }
    workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    common = {"control_net": ["9", 0], "image": ["10", 0]}
    if apply_class == "ControlNetApply":
        workflow["11"] = {"class_type": apply_class, "inputs": {"conditioning": ["3", 0], **common}}
        workflow[SAMPLER]["inputs"]["positive"] = ["11", 0]
    else:
        workflow["11"] = {
            "class_type": apply_class,
            "inputs": {
                "positive": ["3", 0],
                "negative": ["4", 0],
                **common,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        }
        workflow[SAMPLER]["inputs"].update(positive=["11", 0], negative=["11", 1])
    samples = {}
    for strength in (0.0, 1.0):
        workflow["11"]["inputs"]["strength"] = strength
        samples[strength] = sampled(run_workflow, workflow, shared_cache)
    plain = sampled(run_workflow, txt2img(lora=False), shared_cache)
    assert torch.equal(samples[0.0], plain)
    assert not torch.allclose(samples[1.0], plain, atol=1e-4)


def test_changing_the_seed_reruns_only_the_sampler_and_what_follows(run_workflow) -> None:
    cache = ExecutionCache()
    first = run_workflow(txt2img(seed=1), cache=cache)
    assert first.executed == ("1", "2", "3", "4", "5", "6", "7", "8")
    second = run_workflow(txt2img(seed=2), cache=cache)
    assert second.executed == ("6", "7", "8")
    assert all(second.timings[node_id].cache_hit for node_id in ("2", "3", "4", "5"))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_an_area_covering_the_whole_image_changes_nothing(
    run_workflow, shared_cache, strength: float
) -> None:
    """ComfyUI weights an area's prediction by its strength and divides by the weights' sum."""
    whole = txt2img()
    whole["20"] = {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": ["3", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": strength},
    }
    whole[SAMPLER]["inputs"]["positive"] = ["20", 0]
    expected = sampled(run_workflow, txt2img(), shared_cache)
    assert torch.allclose(sampled(run_workflow, whole, shared_cache), expected, atol=1e-5)


def test_hires_fix_upscales_between_two_samplers(run_workflow) -> None:
    """The common "hires fix": sample, LatentUpscaleBy (bislerp), sample again at denoise 0.5."""
    workflow = txt2img()
    workflow["20"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": [SAMPLER, 0], "upscale_method": "bislerp", "scale_by": 1.5},
    }
    workflow["21"] = {
        "class_type": "KSampler",
        "inputs": {**workflow[SAMPLER]["inputs"], "latent_image": ["20", 0], "denoise": 0.5},
    }
    workflow[DECODE]["inputs"]["samples"] = ["21", 0]
    result = run_workflow(workflow)
    assert result.outputs["20"][0]["samples"].shape == (1, 4, 12, 12)
    assert result.outputs[DECODE][0].shape == (1, 96, 96, 3)
    assert png_pixels(result.saved_files[0]).shape == (96, 96, 3)
