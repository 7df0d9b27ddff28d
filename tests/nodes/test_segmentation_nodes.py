"""Semantic segmentation preprocessors: the hint (each pixel its best label's colour), the network
input, the palette, and the files refused before any network is built."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.models.segmentation_model import (
    bit_palette,
    load_segmentation_model,
    save_segmentation_model,
    segmentation_network,
    tiny_segmentation_config,
)
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.nodes.segmentation import DEFAULT_MODEL, segmentation_map, semantic_segmentation
from diffsplit.engine.store import ModelStore
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def context(models_dir: Path) -> Any:
    return SimpleNamespace(node_id="50", model_path=ModelStore(models_dir).resolve)


def photo(seed: int, height: int = 40, width: int = 56) -> torch.Tensor:
    return torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(seed))


def tiny(models_dir: Path) -> Any:
    return load_segmentation_model(models_dir / "preprocessors" / DEFAULT_MODEL)


def test_each_pixel_takes_the_colour_of_its_best_label(models_dir: Path) -> None:
    image = photo(1)
    (hint,) = semantic_segmentation(context(models_dir), image=image, resolution=64)
    assert hint.shape == (2, 40, 56, 3)
    model = tiny(models_dir)
    seen: list[torch.Tensor] = []
    handle = model.network.register_forward_hook(lambda module, args, out: seen.append(out.logits))
    try:
        again = segmentation_map(image, model.network, model.palette, model.stride, 64)
    finally:
        handle.remove()
    assert torch.equal(hint, again)
    labels = torch.nn.functional.interpolate(seen[0], size=(40, 56), mode="bilinear").argmax(dim=1)
    assert torch.equal(hint, model.palette[labels])
    assert len(hint.reshape(-1, 3).unique(dim=0)) > 1  # the tiny model's labels vary over the image


def test_the_network_sees_the_short_side_at_the_resolution_in_multiples_of_32(models_dir: Path) -> None:
    model = tiny(models_dir)
    seen: list[torch.Size] = []
    handle = model.network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True)
    try:
        segmentation_map(photo(2, 48, 100), model.network, model.palette, model.stride, 64)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 3, 64, 128])]  # 64 x 133.3, rounded to multiples of 32


def test_the_palette_is_the_files_and_the_bit_map_without_one(models_dir: Path, tmp_path: Path) -> None:
    model = tiny(models_dir)
    assert torch.equal(model.palette, bit_palette(12))
    assert bit_palette(4).mul(255).round().int().tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                                                [128, 128, 0]]
    network = segmentation_network(tiny_segmentation_config(labels=3))
    plain = save_segmentation_model(tmp_path / "plain.safetensors", network)
    assert torch.equal(load_segmentation_model(plain).palette, bit_palette(3))
    colours = [[255, 0, 0], [0, 9, 0], [1, 2, 3]]
    coloured = save_segmentation_model(tmp_path / "coloured.safetensors", network, colours)
    assert load_segmentation_model(coloured).palette[1].tolist() == pytest.approx([0, 9 / 255, 0])
    short = save_segmentation_model(tmp_path / "short.safetensors", network, [[255, 0, 0]])
    with pytest.raises(ModelFileError, match="palette must hold 3 colours"):
        load_segmentation_model(short)


def rewritten(path: Path, target: Path, edit: Any) -> Path:
    """``path`` with its config edited by ``edit``, written to ``target``."""
    with safe_open(str(path), framework="pt") as opened:
        metadata = dict(opened.metadata())
    config = json.loads(metadata["config"])
    edit(config)
    metadata["config"] = json.dumps(config)
    save_file(load_file(str(path)), str(target), metadata=metadata)
    return target


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda c: c.update(model_type="depth_anything"), "not a upernet config"),
    (lambda c: c["backbone_config"].update(model_type="swin"), "backbone must be one of"),
    (lambda c: c.update(use_timm_backbone=True), "sets use_timm_backbone, which would load another backbone"),
    (lambda c: c.update(backbone="some/hub-model"), "sets backbone"),
    (lambda c: c["backbone_config"].update(hidden_sizes=[8, 16, 32, 10**9]),
     r"hidden_sizes\[3\] = 1000000000"),
    (lambda c: c["backbone_config"].update(depths=[1, 1, 1, 500]), "asks for 503 layers"),
    (lambda c: c["backbone_config"].update(hidden_sizes=[8, 16, 32, 48]),
     "weights do not fit its UperNet config"),
])
def test_configs_that_are_not_safe_or_do_not_fit_are_refused_before_building(
    models_dir: Path, tmp_path: Path, edit: Any, reason: str,
) -> None:
    path = rewritten(models_dir / "preprocessors" / DEFAULT_MODEL, tmp_path / "edited.safetensors", edit)
    with pytest.raises(ModelFileError, match=reason):
        load_segmentation_model(path)


def test_files_of_other_kinds_are_refused(models_dir: Path) -> None:
    with pytest.raises(ModelFileError, match="not a diffsplit UperNet file"):
        load_segmentation_model(models_dir / "preprocessors" / "tiny-depth-anything.safetensors")


def test_both_names_are_preprocessors_with_the_pack_inputs() -> None:
    registry = default_registry()
    for name in ("UniFormer-SemSegPreprocessor", "SemSegPreprocessor"):
        node = registry[name]
        assert [spec.name for spec in node.inputs] == ["image", "resolution", "ckpt_name"]
        assert node.category == "image/preprocessors"
