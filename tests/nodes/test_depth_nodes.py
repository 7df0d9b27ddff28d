"""Depth Anything preprocessors: the hint they make, the network input they build, the files they refuse,
and the same map when the node runs on a worker."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.depth_model import (
    depth_network,
    load_depth_model,
    save_depth_model,
    tiny_depth_config,
)
from diffsplit.engine.models.tiny import TINY_DEPTH_FILE
from diffsplit.engine.nodes.depth import depth_anything
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def context(models_dir: Path) -> Any:
    store = ModelStore(models_dir)
    return SimpleNamespace(node_id="23", model_path=store.resolve)


def photo(seed: int, height: int = 48, width: int = 64) -> torch.Tensor:
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_the_hint_is_a_normalised_three_channel_image_of_the_input_size(models_dir: Path) -> None:
    ctx = context(models_dir)
    (hint,) = depth_anything(ctx, image=photo(1), ckpt_name=TINY_DEPTH_FILE, resolution=64)
    assert hint.shape == (1, 48, 64, 3)
    assert float(hint.min()) == 0.0 and float(hint.max()) == pytest.approx(1.0)
    assert torch.equal(hint[..., 0], hint[..., 2])
    (again,) = depth_anything(ctx, image=photo(1), ckpt_name=TINY_DEPTH_FILE, resolution=64)
    assert torch.equal(hint, again)
    (other,) = depth_anything(ctx, image=photo(2), ckpt_name=TINY_DEPTH_FILE, resolution=64)
    assert not torch.equal(hint, other)


def test_rows_of_a_batch_are_mapped_on_their_own(models_dir: Path) -> None:
    ctx = context(models_dir)
    both = torch.cat([photo(1), photo(2)])
    (hints,) = depth_anything(ctx, image=both, ckpt_name=TINY_DEPTH_FILE, resolution=64)
    (first,) = depth_anything(ctx, image=photo(1), ckpt_name=TINY_DEPTH_FILE, resolution=64)
    assert torch.allclose(hints[:1], first, atol=1e-5)


@pytest.mark.parametrize(("resolution", "expected"), [(64, (70, 84)), (128, (126, 168))])
def test_the_network_sees_the_short_side_at_the_resolution_in_whole_patches(
    models_dir: Path, resolution: int, expected: tuple[int, int],
) -> None:
    seen: list[tuple[int, ...]] = []
    model = load_depth_model(models_dir / "preprocessors" / TINY_DEPTH_FILE)
    handle = model.network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["pixel_values"].shape)), with_kwargs=True)
    try:
        depth_anything(context(models_dir), image=photo(3), ckpt_name=TINY_DEPTH_FILE, resolution=resolution)
    finally:
        handle.remove()
    assert seen == [(1, 3, *expected)]


def test_files_that_are_not_depth_models_are_refused_with_the_reason(
    models_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelFileError, match="not a diffsplit Depth Anything file"):
        load_depth_model(models_dir / "controlnet" / "tiny-sd15-controlnet.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_depth_model(broken)
    config = tiny_depth_config()
    network = depth_network(config)
    mismatched = save_depth_model(tmp_path / "mismatched.safetensors", network)
    # the same file with a config that names a wider backbone: its weights no longer fit


    with safe_open(str(mismatched), framework="pt") as opened:
        metadata = dict(opened.metadata())
    config["backbone_config"]["hidden_size"] = 48
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(mismatched)), str(mismatched), metadata=metadata)
    with pytest.raises(ModelFileError, match="do not fit its Depth Anything config"):
        load_depth_model(mismatched)


def test_both_versions_are_preprocessors_reading_the_preprocessors_folder() -> None:
    registry = default_registry()
    for name in ("DepthAnythingPreprocessor", "DepthAnythingV2Preprocessor"):
        node = registry[name]
        assert node.category == "image/preprocessors"
        spec = node.input("ckpt_name")
        assert spec is not None and spec.model_folder == "preprocessors"
