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
from diffsplit.engine.nodes.segmentation import segmentation_map, semantic_segmentation
from diffsplit.engine.store import ModelStore
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def context(models_dir: Path) -> Any:
    return SimpleNamespace(node_id="50", model_path=ModelStore(models_dir).resolve)


def photo(seed: int, height: int = 40, width: int = 56) -> torch.Tensor:
    return torch.rand(2, height, width, 3, generator=torch.Generator().manual_seed(seed))


#: the tiny set's UperNet on ConvNeXt (transformers' layout); the default name is the pack's UniFormer
CONVNEXT = "upernet.safetensors"


def tiny(models_dir: Path) -> Any:
    return load_segmentation_model(models_dir / "preprocessors" / CONVNEXT)


def test_each_pixel_takes_the_colour_of_its_best_label(models_dir: Path) -> None:
    image = photo(1)
    (hint,) = semantic_segmentation(context(models_dir), image=image, resolution=64, ckpt_name=CONVNEXT)
    assert hint.shape == (2, 40, 56, 3)
    model = tiny(models_dir)
    seen: list[torch.Tensor] = []
    handle = model.network.register_forward_hook(lambda module, args, out: seen.append(out.logits))
    try:
        again = segmentation_map(image, model, 64)
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
        segmentation_map(photo(2, 48, 100), model, 64)
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
    path = rewritten(models_dir / "preprocessors" / CONVNEXT, tmp_path / "edited.safetensors", edit)
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


# the pack's own network: UniFormer-UperNet in mmsegmentation's keys

PACK_KEYS = (  # names from the pack's upernet_global_small.pth, one of each kind
    "backbone.patch_embed1.proj.weight", "backbone.patch_embed1.norm.bias",
    "backbone.blocks1.0.pos_embed.weight", "backbone.blocks1.0.norm1.running_var",
    "backbone.blocks1.0.conv1.weight", "backbone.blocks1.0.attn.weight", "backbone.blocks1.0.conv2.bias",
    "backbone.blocks2.0.mlp.fc1.weight", "backbone.blocks3.0.norm1.weight",
    "backbone.blocks3.0.attn.qkv.bias",
    "backbone.blocks3.0.attn.proj.weight", "backbone.blocks4.0.mlp.fc2.bias", "backbone.norm4.weight",
    "decode_head.conv_seg.weight", "decode_head.psp_modules.3.1.conv.weight",
    "decode_head.psp_modules.0.1.bn.num_batches_tracked", "decode_head.bottleneck.bn.running_mean",
    "decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.bn.weight",
    "decode_head.fpn_bottleneck.conv.weight",
)


def pack_checkpoint(path: Path, state: dict[str, torch.Tensor], palette: list[list[int]]) -> Path:
    """``state`` as mmsegmentation saves a checkpoint: meta (classes, palette, config text) and the
    state dict, with the auxiliary head the pack's file also holds."""
    auxiliary = {"auxiliary_head.conv_seg.weight": torch.zeros(len(palette), 8, 1, 1),
                 "auxiliary_head.convs.0.conv.weight": torch.zeros(8, 32, 3, 3)}
    meta = {"CLASSES": tuple(f"label {i}" for i in range(len(palette))), "PALETTE": palette,
            "mmseg_version": "0.11.0", "config": "model = dict(type='EncoderDecoder')",
            "head_dim": 16}  # the tiny widths' heads (the pack's 64 is the default)
    torch.save({"meta": meta, "state_dict": {**state, **auxiliary}}, path)
    return path


def test_the_pack_network_has_the_packs_keys_and_size() -> None:
    from diffsplit.engine.models.uniformer import UniFormerShape, UniFormerUperNet, file_key

    shape = UniFormerShape(widths=(64, 128, 320, 512), blocks=(3, 4, 8, 3), hidden_ratio=4.0, qkv_bias=True,
                           head_dim=64, head_channels=512, labels=150)
    with torch.device("meta"):
        network = UniFormerUperNet(shape)
    keys = {file_key(key) for key in network.state_dict()}
    assert set(PACK_KEYS) <= keys
    assert not [key for key in keys if not key.startswith(("backbone.", "decode_head."))]
    # UniFormer-S is 22M parameters with its 1000-class head, UperNet on it 52M with the auxiliary head
    backbone = sum(p.numel() for p in network.backbone.parameters())
    assert 21.0e6 < backbone + 512 * 1000 < 22.0e6
    assert 50.0e6 < sum(p.numel() for p in network.parameters()) < 51.5e6


def test_the_default_name_reads_the_packs_network_fed_as_the_packs_pipeline_feeds_it(
    models_dir: Path,
) -> None:
    image = photo(4)  # 40 x 56
    (hint,) = semantic_segmentation(context(models_dir), image=image, resolution=64)
    model = load_segmentation_model(models_dir / "preprocessors" / "upernet_global_small.safetensors")
    assert model.pack_pipeline and model.palette.shape == (12, 3)
    seen: list[torch.Tensor] = []
    handle = model.network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    try:
        again = segmentation_map(image, model, 64)
        segmentation_map(image, model, 1024)  # the resolution does not change what the network sees
        segmentation_map(photo(4, 20, 200), model, 64)  # a long side past 2048 at short side 512
    finally:
        handle.remove()
    assert torch.equal(hint, again) and hint.shape == (2, 40, 56, 3)
    assert len(hint.reshape(-1, 3).unique(dim=0)) > 1
    # mmsegmentation's Resize(keep_ratio) to fit 2048 x 512: 40 x 56 -> 512 x 717
    assert [tuple(x.shape[-2:]) for x in seen] == [(512, 717), (512, 717), (205, 2048)]
    resized = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(512, 717), mode="bilinear",
                                              align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], (resized.flip(1) - mean) / std, atol=1e-6)  # blue first


def test_the_best_label_is_taken_one_map_at_a_time_as_argmax_would() -> None:
    from diffsplit.engine.nodes.segmentation import best_labels

    scores = torch.randn(2, 9, 7, 11, generator=torch.Generator().manual_seed(3))
    scores[:, 4] = scores[:, 2]  # ties go to the lower label
    expected = torch.nn.functional.interpolate(scores, size=(30, 41), mode="bilinear",
                                               align_corners=False).argmax(dim=1)
    assert torch.equal(best_labels(scores, 30, 41), expected)


def test_the_packs_pth_checkpoint_loads_with_its_palette_and_equals_the_safetensors_twin(
    models_dir: Path, tmp_path: Path,
) -> None:
    from diffsplit.engine.models.uniformer import tiny_uniformer_state

    colours = [[(37 * i) % 256, (91 * i) % 256, (13 * i) % 256] for i in range(12)]
    pth = pack_checkpoint(tmp_path / "upernet_global_small.pth", tiny_uniformer_state(0), colours)
    from_pth = load_segmentation_model(pth)
    assert from_pth.palette.mul(255).round().int().tolist() == colours
    twin = load_segmentation_model(models_dir / "preprocessors" / "upernet_global_small.safetensors")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(from_pth.scores(pixels), twin.scores(pixels))
    # the pack's name in a models folder holding only the .pth
    folder = tmp_path / "models"
    (folder / "preprocessors").mkdir(parents=True)
    pth.rename(folder / "preprocessors" / pth.name)
    (hint,) = semantic_segmentation(context(folder), image=photo(4), resolution=64)
    colour_set = {tuple(c) for c in hint.reshape(-1, 3).mul(255).round().int().tolist()}
    assert colour_set <= {tuple(c) for c in colours}


def test_uniformer_files_that_do_not_fit_or_are_too_large_are_refused(tmp_path: Path) -> None:
    from diffsplit.engine.models.uniformer import tiny_uniformer_state

    def refused(state: dict[str, torch.Tensor], reason: str, metadata: dict[str, str] | None = None) -> None:
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path), metadata={"head_dim": "16", **(metadata or {})})
        with pytest.raises(ModelFileError, match=reason):
            load_segmentation_model(path)
        path.unlink()

    state = tiny_uniformer_state(0)
    refused({k: v for k, v in state.items() if k != "decode_head.bottleneck.conv.weight"},
            "decode_head.bottleneck.conv.weight is None in the file")
    refused({**state, "backbone.blocks3.0.attn.qkv.weight": torch.zeros(96, 30)}, "do not fit")
    refused(state, "do not split into heads of 24", {"head_dim": "24"})
    refused(state, "head_dim metadata is not a whole number", {"head_dim": "many"})
    deep = {**state, "backbone.blocks2.99.conv1.weight": torch.zeros(16, 16, 1, 1)}
    refused(deep, "1..64 blocks a stage")
    refused({k: v for k, v in state.items() if not k.startswith("decode_head.psp_modules.3.")},
            "pools at 3 scales")
    refused({**state, "decode_head.conv_seg.weight": torch.zeros(2000, 16, 1, 1),
             "decode_head.conv_seg.bias": torch.zeros(2000)}, "2000 labels are over the limits")
    refused({**state, "backbone.blocks1.0.mlp.fc1.weight": torch.zeros(800, 8, 1, 1)},
            "feed-forward width of 800")
    refused({**state, "decode_head.psp_modules.x.1.conv.weight": torch.zeros(1)}, "not numbered")
    pickled = tmp_path / "upernet_global_small.pth"
    torch.save({"meta": {"hook": SimpleNamespace()}, "state_dict": state}, pickled)
    with pytest.raises(ModelFileError, match="not a readable torch checkpoint"):
        load_segmentation_model(pickled)
