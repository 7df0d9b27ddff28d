"""T2I-Adapter files through ControlNetLoader: both key layouts, the config from the shapes, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.checkpoint import load_controlnet
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.t2i_adapter import original_layout, tiny_t2i_adapter
from diffusers import T2IAdapter


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_both_layouts_load_to_the_same_adapter(tmp_path: Path, blocks: int) -> None:
    adapter = tiny_t2i_adapter((32, 64, 64), seed=3, blocks=blocks)
    original = tmp_path / "original.safetensors"
    save_file_sorted(original_layout(adapter), original)
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file_sorted({k: v.contiguous() for k, v in adapter.state_dict().items()}, diffusers_file)
    for path in (original, diffusers_file):
        loaded = load_controlnet(path).model
        assert isinstance(loaded, T2IAdapter)
        assert loaded.config["channels"] == [32, 64, 64] and loaded.config["num_res_blocks"] == blocks
        assert loaded.config["downscale_factor"] == 8
        assert same_weights(loaded, adapter)


def test_a_broken_adapter_file_is_refused_naming_it(tmp_path: Path) -> None:
    tensors = original_layout(tiny_t2i_adapter((32, 64)))
    tensors["conv_in.weight"] = torch.zeros(32, 100, 3, 3)  # not 3 colour channels times a square
    path = tmp_path / "odd.safetensors"
    save_file_sorted(tensors, path)
    with pytest.raises(ModelFileError, match=r"odd\.safetensors: T2I-Adapter: .*not a full RGB adapter"):
        load_controlnet(path)
