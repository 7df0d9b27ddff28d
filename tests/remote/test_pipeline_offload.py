"""diffsplit.offload on plain diffusers code: a module's forward or a whole pipeline call remote == local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffsplit.engine.call_offload import OffloadError
from diffusers import StableDiffusionPipeline

import diffsplit

PROMPT = "a cat in a hat"


def generate(pipe, seed: int = 0) -> np.ndarray:
    result = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                  output_type="np", height=64, width=64)
    return result.images


@pytest.fixture(scope="module")
def traced_pipeline(models_dir: Path):
    with diffsplit.tracing() as trace:
        pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
        pipe.load_lora_weights(str(models_dir / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
    pipe.set_progress_bar_config(disable=True)
    return pipe, trace


def test_unet_forward_offloaded_equals_local(traced_pipeline, worker_address: str) -> None:
    pipe, trace = traced_pipeline
    local = generate(pipe)
    with diffsplit.offload(pipe, "unet", to=worker_address, trace=trace) as handle:
        assert "forward" in vars(pipe.unet)
        split = generate(pipe)
    assert handle.module is pipe.unet and "forward" not in vars(pipe.unet)
    np.testing.assert_array_equal(local, split)


def test_whole_pipeline_offloaded_equals_local_and_pil_output_works(
    traced_pipeline, worker_address: str
) -> None:
    pipe, trace = traced_pipeline
    generator = torch.Generator().manual_seed(5)
    local = pipe(PROMPT, num_inference_steps=2, generator=generator, height=64, width=64).images[0]
    local_state = generator.get_state()
    with diffsplit.offload(pipe, to=worker_address, trace=trace) as remote:
        generator = torch.Generator().manual_seed(5)
        split = remote(PROMPT, num_inference_steps=2, generator=generator, height=64, width=64).images[0]
    assert np.array_equal(np.asarray(local), np.asarray(split))
    assert torch.equal(generator.get_state(), local_state), "the local generator advances as if run here"


def test_untraced_whole_pipeline_with_lora_is_refused_before_anything_is_sent(traced_pipeline) -> None:
    pipe, _ = traced_pipeline  # loaded from a folder, but a LoRA was added: the folder alone is not it
    # an unreachable address: a refusal that needed the worker could not come back at all (a component's
    # adapters travel by content instead: tests/remote/test_untraced_adapters.py)
    with pytest.raises(OffloadError, match="LoRA adapters are loaded"):
        diffsplit.offload(pipe, to="tcp://127.0.0.1:9")
    assert "forward" not in vars(pipe.unet)


def test_untraced_weights_edited_in_place_are_refused_before_anything_is_sent(models_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.01)  # what no file holds, and no hook can see
    # an unreachable address: the refusal comes from this machine, before any connection
    refusal = r"conv_in\.weight differs .* edited in place .* diffsplit\.tracing"
    with pytest.raises(OffloadError, match=refusal):
        diffsplit.offload(pipe, "unet", to="tcp://127.0.0.1:9")
    assert "forward" not in vars(pipe.unet)


def test_untraced_whole_pipeline_with_changed_weights_is_refused_by_the_fingerprint(
    models_dir: Path, worker_address: str
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(0.01)
    with diffsplit.offload(pipe, to=worker_address) as remote, pytest.raises(OffloadError, match="differs"):
        remote(PROMPT, num_inference_steps=1, height=64, width=64)


def test_untraced_plain_pipeline_offloads_from_its_folder(models_dir: Path, worker_address: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    local = generate(pipe, seed=3)
    with diffsplit.offload(pipe, "unet", to=worker_address):
        split = generate(pipe, seed=3)
    np.testing.assert_array_equal(local, split)


def test_the_offloaded_forward_keeps_the_original_signature(traced_pipeline, worker_address: str) -> None:
    import inspect

    pipe, trace = traced_pipeline
    before = inspect.signature(pipe.unet.forward)
    with diffsplit.offload(pipe, "unet", to=worker_address, trace=trace):
        assert inspect.signature(pipe.unet.forward) == before
        assert "encoder_hidden_states" in inspect.signature(pipe.unet.forward).parameters


def test_offload_composes_with_enable_model_cpu_offload_and_restores_exactly(
    models_dir: Path, worker_address: str
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    unet = pipe.unet
    local = generate(pipe)  # diffusers hooks the modules again after each call
    inner_forward = vars(unet)["_old_forward"]
    with diffsplit.offload(pipe, "unet", to=worker_address):
        assert vars(unet)["_old_forward"] is not inner_forward and unet._hf_hook is not None
        split = generate(pipe)
    assert vars(unet)["_old_forward"] is inner_forward and unet._hf_hook is not None
    np.testing.assert_array_equal(local, split)
    np.testing.assert_array_equal(generate(pipe), local)


def test_an_accelerate_hook_still_runs_around_the_remote_forward(
    models_dir: Path, worker_address: str
) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountingHook(ModelHook):
        def __init__(self) -> None:
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    hook = CountingHook()
    add_hook_to_module(pipe.unet, hook)
    local = generate(pipe)
    local_calls, hook.calls = hook.calls, 0
    inner_forward = vars(pipe.unet)["_old_forward"]
    with diffsplit.offload(pipe, "unet", to=worker_address):
        split = generate(pipe)
        with pytest.raises(OffloadError, match="already offloaded"):
            diffsplit.offload(pipe, "unet", to=worker_address)
    assert hook.calls == local_calls > 0
    np.testing.assert_array_equal(local, split)
    assert vars(pipe.unet)["_old_forward"] is inner_forward
    remove_hook_from_module(pipe.unet)
    np.testing.assert_array_equal(generate(pipe), local)
