"""Recipes that name files, not folders: workers in another layout, or with a Hugging Face cache, serve them.

Real worker processes on loopback. The client loads as users do: a pipeline folder under a trace, or a hub
id from the local Hugging Face cache with a LoRA added outside any trace.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffsplit.engine.call_offload import OffloadError
from diffusers import StableDiffusionPipeline

import diffsplit
from tests.hub_cache_layout import hub_cache

from .test_bounded_work import started_worker

PROMPT = "a cat in a hat"
REPO = "tiny-org/tiny-sd15"
LORA = "tiny-sd15-lora.safetensors"


def generate(pipe: StableDiffusionPipeline) -> np.ndarray:
    result = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np", height=64, width=64)
    return result.images


def relaid_store(source: Path, root: Path) -> Path:
    """A worker store holding the UNet's files as a model folder of their own, and the pipeline's index
    elsewhere, with extra files beside them: none of it in the client's folder layout."""
    unet = root / "diffusers" / "their-unet"
    unet.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copyfile(source / "unet" / name, unet / name)
    (unet / "README.md").write_text("a model card")
    index = root / "diffusers" / "their-index"
    index.mkdir()
    shutil.copyfile(source / "model_index.json", index / "model_index.json")
    (index / "config.json").write_text("{}")  # listed as a model folder: the store shows its files
    (root / "loras").mkdir()
    return root


def test_a_worker_in_another_layout_serves_a_traced_unet_with_its_lora(
    models_dir: Path, tmp_path: Path
) -> None:
    store = relaid_store(models_dir / "diffusers" / "tiny-sd15", tmp_path / "store")
    shutil.copyfile(models_dir / "loras" / LORA, store / "loras" / "renamed.safetensors")
    with diffsplit.tracing() as trace:
        pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
        pipe.load_lora_weights(str(models_dir / "loras" / LORA), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
    pipe.set_progress_bar_config(disable=True)
    local = generate(pipe)
    with started_worker(store) as address, diffsplit.offload(pipe, "unet", to=address, trace=trace):
        split = generate(pipe)
    np.testing.assert_array_equal(local, split)


@pytest.fixture
def hub_pipeline(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StableDiffusionPipeline:
    """The tiny SD 1.5 loaded by hub id from this machine's (default) Hugging Face cache, offline, with a
    LoRA added outside any trace."""
    cache = hub_cache(tmp_path / "client-hub", REPO, models_dir / "diffusers" / "tiny-sd15")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pipe = StableDiffusionPipeline.from_pretrained(REPO)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(models_dir / "loras" / LORA), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    return pipe


def test_a_hub_id_pipeline_with_an_untraced_lora_is_served_from_the_workers_hub_cache(
    hub_pipeline: StableDiffusionPipeline, models_dir: Path, tmp_path: Path
) -> None:
    # the worker's cache holds the same files under another repository name
    worker_hub = hub_cache(tmp_path / "worker-hub", "someone-else/a-copy",
                           models_dir / "diffusers" / "tiny-sd15")
    empty_store = tmp_path / "empty-store"
    (empty_store / "loras").mkdir(parents=True)
    local = generate(hub_pipeline)
    flags = ("--hf-cache", str(worker_hub), "--allow-upload", "--insecure")
    with started_worker(empty_store, *flags) as address, \
            diffsplit.offload(hub_pipeline, "unet", to=address) as handle:
        split = generate(hub_pipeline)
    np.testing.assert_array_equal(local, split)
    assert handle.sender.uploads == 1  # only the adapter crossed; the UNet came from the worker's own cache
    assert list((empty_store / "loras").iterdir()) == []


def test_without_the_hub_cache_the_worker_names_the_file_it_lacks(
    hub_pipeline: StableDiffusionPipeline, models_dir: Path, tmp_path: Path
) -> None:
    worker_hub = hub_cache(tmp_path / "worker-hub", REPO, models_dir / "diffusers" / "tiny-sd15")
    empty_store = tmp_path / "empty-store"
    (empty_store / "loras").mkdir(parents=True)
    flags = ("--hf-cache", str(worker_hub), "--no-hf-cache", "--allow-upload", "--insecure")
    with started_worker(empty_store, *flags) as address, \
            diffsplit.offload(hub_pipeline, "unet", to=address), pytest.raises(OffloadError) as caught:
        generate(hub_pipeline)
    assert "unet/" in str(caught.value) and "sha256" in str(caught.value)
