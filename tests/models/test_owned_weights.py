"""Every loader gives weights in allocator-owned memory: outputs depend on values, never on addresses.

A tensor read straight from a ``.safetensors`` file sits at the file's byte
offset (``data_ptr() % 64`` of 4, 36, 52...), and on some CPUs the SIMD
kernels then give other bits than for the same values in fresh memory. These
tests check the property itself on every loading path (the CPU this runs on
may not show the difference in outputs): each parameter and buffer is 64-byte
aligned and no model keeps its file mapped after loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint, load_controlnet, load_vae
from diffsplit.engine.models.lora import apply_lora, load_lora
from diffsplit.engine.rebuild import build, store_resolver
from diffsplit.engine.store import ModelStore
from diffsplit.tracer.owned_memory import ALIGNMENT, is_owned, own_module, own_weights, owned_tensor
from diffsplit.tracer.session import tracing
from safetensors.torch import load_file


def _tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    modules = [value] if isinstance(value, torch.nn.Module) else []
    if not modules:
        for field in ("unet", "model", "encoders"):
            inner = getattr(value, field, None)
            modules += list(inner) if isinstance(inner, tuple) else [inner] if inner is not None else []
    for module in modules:
        yield from module.named_parameters()
        yield from module.named_buffers()


def assert_owned(value: Any) -> None:
    tensors = list(_tensors(value))
    assert tensors, f"no tensors found in {type(value).__name__}"
    misplaced = [name for name, tensor in tensors if tensor.numel() and tensor.data_ptr() % ALIGNMENT]
    assert not misplaced, f"{len(misplaced)} tensors not 64-byte aligned, e.g. {misplaced[:3]}"


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_file_tensors_are_misaligned_as_read_so_the_check_can_fail(models_dir: Path) -> None:
    state = load_file(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    assert any(t.numel() and t.data_ptr() % ALIGNMENT for t in state.values())
    assert own_weights(state) > 0
    assert all(is_owned(t) for t in state.values())


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-sdxl-refiner"])
def test_single_file_checkpoints_load_into_owned_memory(models_dir: Path, name: str) -> None:
    path = models_dir / "checkpoints" / f"{name}.safetensors"
    parts = load_checkpoint(path)
    for part in (parts.model, parts.clip, parts.vae):
        assert_owned(part)
    if Path("/proc/self/maps").exists():
        assert str(path) not in mapped_files(), "the loaded model still maps its file"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vae_and_controlnet_load_into_owned_memory(models_dir: Path, dtype: torch.dtype) -> None:
    assert_owned(load_vae(models_dir / "vae" / "tiny-vae.safetensors", dtype=dtype))
    assert_owned(load_controlnet(models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors", dtype=dtype))


def test_lora_patched_models_are_owned(models_dir: Path) -> None:
    parts = load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")
    lora = load_lora(models_dir / "loras" / "tiny-sd15-lora.safetensors")
    for patch in lora.unet.values():
        assert is_owned(patch.down) and is_owned(patch.up)
    model, clip = apply_lora(parts.model, parts.clip, lora, 0.8, 0.8)
    assert_owned(model)
    assert_owned(clip)


def test_traced_diffusers_loaders_give_owned_weights(models_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = models_dir / "diffusers" / "tiny-sd15"
    untraced = StableDiffusionPipeline.from_pretrained(str(folder))
    with tracing() as recorded:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert_owned(module)
    # the same values as an untraced load: only their place in memory changed
    expected = untraced.unet.state_dict()
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    recipe = recorded.recipe(pipe.unet)
    rebuilt = build(recipe, store_resolver(ModelStore(models_dir)))
    assert_owned(rebuilt)


def test_owned_tensor_copies_misaligned_tensors_only() -> None:
    raw = torch.arange(40, dtype=torch.float32)
    aligned = raw[:16]
    shifted = raw[1:17]  # 4 bytes past the block's start
    assert is_owned(aligned) and not is_owned(shifted)
    assert owned_tensor(aligned) is aligned
    fresh = owned_tensor(shifted)
    assert fresh is not shifted and is_owned(fresh) and torch.equal(fresh, shifted)
    assert owned_tensor(aligned, force=True) is not aligned


def test_own_module_keeps_tied_weights_tied_and_versions_unchanged() -> None:
    storage = torch.randn(1 + 4 * 4)
    first, second = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    first.weight = torch.nn.Parameter(storage[1:].view(4, 4))  # misaligned
    second.weight = first.weight  # tied
    first.register_buffer("scale", storage[1:5])
    holder = torch.nn.Sequential(first, second)
    version = first.weight._version
    expected = first.weight.detach().clone()
    moved = own_module(holder)
    assert moved == 2  # the tied weight once, and the buffer
    assert second.weight is first.weight and is_owned(first.weight) and is_owned(first.scale)
    assert first.weight._version == version
    assert torch.equal(first.weight, expected)
