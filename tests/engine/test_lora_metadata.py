"""A LoRA file's own peft config is data only: keys that import, decompose or start machinery are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.lora_metadata import ADAPTER_METADATA_KEY, check_adapter_file
from diffsplit.tracer.errors import RecipeError
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def saved_adapter(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter as diffusers saves it (``save_lora_adapter``: its peft config in the header)."""
    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd15", subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
                     adapter_name="style")
    folder = tmp_path_factory.mktemp("adapter")
    unet.save_lora_adapter(folder, adapter_name="style")
    (path,) = folder.glob("*.safetensors")
    return path


def config_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[ADAPTER_METADATA_KEY])


def with_config(source: Path, target: Path, config: dict[str, Any]) -> Path:
    """``source``'s tensors under ``config`` (what a peer could upload)."""
    save_file(load_file(source), target, metadata={"format": "pt", ADAPTER_METADATA_KEY: json.dumps(config)})
    return target


def test_what_diffusers_saves_passes_and_a_folder_of_it_too(saved_adapter: Path) -> None:
    config = config_of(saved_adapter)
    assert config["r"] == 2 and config["lora_alpha"] == 4  # the header really carries the config
    check_adapter_file(saved_adapter)
    check_adapter_file(saved_adapter.parent)


def test_a_file_without_a_config_passes(saved_adapter: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(saved_adapter), plain)
    check_adapter_file(plain)


@pytest.mark.parametrize(("change", "named"), [
    ({"megatron_config": {"tensor_model_parallel_size": 1}, "megatron_core": "os"}, "megatron"),
    ({"megatron_core": "antigravity"}, "megatron_core"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"eva_config": {"rho": 2.0}}, "eva_config"),
    ({"a_key_from_the_future": 1}, "a_key_from_the_future"),
    ({"r": "2"}, "'r'"),
    ({"r": 0}, "'r'"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"target_modules": [["nested"]]}, "target_modules"),
    ({"rank_pattern": {"to_q": -1}}, "rank_pattern"),
    ({"peft_type": "LOHA"}, "peft_type"),
])
def test_a_config_that_chooses_more_than_data_is_refused(
    saved_adapter: Path, tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    config = {**config_of(saved_adapter), **change}
    tampered = with_config(saved_adapter, tmp_path / "tampered.safetensors", config)
    with pytest.raises(RecipeError, match=named):
        check_adapter_file(tampered)
    with pytest.raises(RecipeError, match=named):  # a folder holding it is refused too
        check_adapter_file(tmp_path)


def test_broken_headers_are_refused(saved_adapter: Path, tmp_path: Path) -> None:
    tensors = load_file(saved_adapter)
    save_file(tensors, tmp_path / "a.safetensors", metadata={ADAPTER_METADATA_KEY: "{not json"})
    with pytest.raises(RecipeError, match="not JSON"):
        check_adapter_file(tmp_path / "a.safetensors")
    save_file(tensors, tmp_path / "b.safetensors", metadata={ADAPTER_METADATA_KEY: "[1, 2]"})
    with pytest.raises(RecipeError, match="not a mapping"):
        check_adapter_file(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(RecipeError, match="not a readable safetensors"):
        check_adapter_file(tmp_path / "c.safetensors")
