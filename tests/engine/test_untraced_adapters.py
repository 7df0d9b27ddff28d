"""Adapters explained by content: reproducible files, exact weights, and what is refused before sending."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.lora_metadata import check_adapter_file
from diffsplit.engine.untraced_adapters import UnexplainedChange, adapter_steps
from diffusers import UNet2DConditionModel
from peft import LoraConfig


def unet_with_adapter(models_dir: Path, seed: int = 0) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd15", subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_v"], init_lora_weights=False),
                     adapter_name="style")
    return unet


def test_no_adapters_no_steps(models_dir: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd15", subfolder="unet")
    assert adapter_steps(unet).steps == () and adapter_steps(unet).files == ()


def test_the_same_adapter_is_the_same_file_and_another_one_is_not(models_dir: Path, tmp_path: Path) -> None:
    first = adapter_steps(unet_with_adapter(models_dir)).files[0]
    again = adapter_steps(unet_with_adapter(models_dir)).files[0]
    other = adapter_steps(unet_with_adapter(models_dir, seed=1)).files[0]
    assert first.data == again.data and first.ref == again.ref  # reproducible: uploaded once, ever
    assert other.ref.sha256 != first.ref.sha256
    assert first.ref.name == f"{first.ref.sha256}.safetensors" and first.ref.bytes == len(first.data)
    path = tmp_path / first.ref.name
    path.write_bytes(first.data)
    check_adapter_file(path)  # what the client sends passes the worker's header check


def test_the_weight_set_here_is_the_weight_the_recipe_sets_exactly(models_dir: Path) -> None:
    unet = unet_with_adapter(models_dir)
    unet.set_adapters(["style"], weights=[0.7])
    steps = adapter_steps(unet).steps
    assert [step.op for step in steps] == ["diffusers.load_lora_adapter", "diffusers.set_adapters"]
    (weight,) = steps[-1].kwargs["weights"]
    layer = next(m for m in unet.modules() if hasattr(m, "scaling") and "style" in m.scaling)
    assert (3 / 2) * weight == layer.scaling["style"]  # the product is bit-exact, not just close
    unet.disable_adapters()
    assert adapter_steps(unet).steps[-1].op == "diffusers.disable_adapters"


def test_per_block_weights_and_fused_adapters_are_refused(models_dir: Path) -> None:
    unet = unet_with_adapter(models_dir)
    unet.set_adapters(["style"], weights=[{"down": 0.5, "mid": 1.0, "up": 1.0}])
    with pytest.raises(UnexplainedChange, match="different weights in different blocks"):
        adapter_steps(unet)
    unet.set_adapters(["style"], weights=[1.0])
    unet.fuse_lora()
    with pytest.raises(UnexplainedChange, match="fused"):
        adapter_steps(unet)
