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


# the pack's own files: the original repository's checkpoint layout

def original_layout(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers Depth Anything's weights under the original repository's keys (its DINOv2
    ``pretrained.*`` and DPT ``depth_head.*``, each block's query, key and value fused into ``qkv``)."""
    from diffsplit.engine.models.depth_pack import attention_names

    state = {key: value.clone() for key, value in network.state_dict().items()}
    layers = network.config.backbone_config.num_hidden_layers
    names = attention_names(network)
    out: dict[str, torch.Tensor] = {
        "pretrained.cls_token": state.pop("backbone.embeddings.cls_token"),
        "pretrained.mask_token": state.pop("backbone.embeddings.mask_token"),
        "pretrained.pos_embed": state.pop("backbone.embeddings.position_embeddings"),
    }
    for part in ("weight", "bias"):
        projection = f"backbone.embeddings.patch_embeddings.projection.{part}"
        out[f"pretrained.patch_embed.proj.{part}"] = state.pop(projection)
        out[f"pretrained.norm.{part}"] = state.pop(f"backbone.layernorm.{part}")
        for i in range(layers):
            layer, block = f"backbone.encoder.layer.{i}.", f"pretrained.blocks.{i}."
            fused = [state.pop(layer + f"{n}.{part}") for n in (names.query, names.key, names.value)]
            out[block + f"attn.qkv.{part}"] = torch.cat(fused)
            out[block + f"attn.proj.{part}"] = state.pop(layer + f"{names.out}.{part}")
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[block + f"{name}.{part}"] = state.pop(layer + f"{name}.{part}")
        for i in range(4):
            reassemble = f"neck.reassemble_stage.layers.{i}."
            out[f"depth_head.projects.{i}.{part}"] = state.pop(reassemble + f"projection.{part}")
            if i != 2:
                out[f"depth_head.resize_layers.{i}.{part}"] = state.pop(reassemble + f"resize.{part}")
            fusion, refine = f"neck.fusion_stage.layers.{3 - i}.", f"depth_head.scratch.refinenet{i + 1}."
            out[refine + f"out_conv.{part}"] = state.pop(fusion + f"projection.{part}")
            for unit in (1, 2):
                for conv in (1, 2):
                    out[refine + f"resConfUnit{unit}.conv{conv}.{part}"] = state.pop(
                        fusion + f"residual_layer{unit}.convolution{conv}.{part}")
        out[f"depth_head.scratch.output_conv1.{part}"] = state.pop(f"head.conv1.{part}")
        out[f"depth_head.scratch.output_conv2.0.{part}"] = state.pop(f"head.conv2.{part}")
        out[f"depth_head.scratch.output_conv2.2.{part}"] = state.pop(f"head.conv3.{part}")
    for i in range(layers):
        for scale in (1, 2):
            out[f"pretrained.blocks.{i}.ls{scale}.gamma"] = state.pop(
                f"backbone.encoder.layer.{i}.layer_scale{scale}.lambda1")
    for i in range(4):
        out[f"depth_head.scratch.layer{i + 1}_rn.weight"] = state.pop(f"neck.convs.{i}.weight")
    assert not state, sorted(state)[:5]
    return out


def pack_sized_network(seed: int = 4) -> torch.nn.Module:
    """A small Depth Anything of the pack's kind: heads 64 wide (two of them), six layers, the last four
    feeding the head as V1's do."""
    from diffsplit.engine.models.depth_model import depth_network
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(hidden_size=128, num_hidden_layers=6, num_attention_heads=2, patch_size=14,
                            image_size=70, out_indices=[3, 4, 5, 6], apply_layernorm=True,
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=128, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                                 depth_estimation_type="relative")
    network = depth_network(config.to_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(network.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return network


#: original keys and their transformers targets, as transformers' conversion script renames them
CONVERSION = (
    ("pretrained.cls_token", "backbone.embeddings.cls_token"),
    ("pretrained.patch_embed.proj.weight", "backbone.embeddings.patch_embeddings.projection.weight"),
    ("pretrained.blocks.3.ls2.gamma", "backbone.encoder.layer.3.layer_scale2.lambda1"),
    ("pretrained.blocks.0.mlp.fc1.bias", "backbone.encoder.layer.0.mlp.fc1.bias"),
    ("pretrained.norm.bias", "backbone.layernorm.bias"),
    ("depth_head.projects.2.weight", "neck.reassemble_stage.layers.2.projection.weight"),
    ("depth_head.resize_layers.3.bias", "neck.reassemble_stage.layers.3.resize.bias"),
    ("depth_head.scratch.refinenet1.out_conv.weight", "neck.fusion_stage.layers.3.projection.weight"),
    ("depth_head.scratch.refinenet4.resConfUnit2.conv1.bias",
     "neck.fusion_stage.layers.0.residual_layer2.convolution1.bias"),
    ("depth_head.scratch.layer1_rn.weight", "neck.convs.0.weight"),
    ("depth_head.scratch.output_conv2.2.weight", "head.conv3.weight"),
)


def test_original_keys_are_renamed_as_transformers_conversion_does() -> None:
    from diffsplit.engine.models.depth_pack import AttentionNames, pack_key

    names = AttentionNames("attention.attention.query", "attention.attention.key",
                           "attention.attention.value", "attention.output.dense")
    for original, target in CONVERSION:
        assert pack_key(original, names) == target
    assert pack_key("pretrained.blocks.5.attn.proj.weight", names) == (
        "backbone.encoder.layer.5.attention.output.dense.weight")
    assert pack_key("pretrained.blocks.5.attn.qkv.weight", names) is None  # split into three


def test_the_packs_v1_checkpoint_gives_the_same_depth_as_the_converted_file(tmp_path: Path) -> None:
    from diffsplit.engine.models.depth_model import save_depth_model

    network = pack_sized_network()
    folder = tmp_path / "models" / "preprocessors"
    folder.mkdir(parents=True)
    save_depth_model(folder / "converted.safetensors", network)
    torch.save(original_layout(network), folder / "depth_anything_vits14.pth")
    image = torch.rand(1, 30, 44, 3, generator=torch.Generator().manual_seed(7))
    ctx = SimpleNamespace(node_id="5", model_path=ModelStore(tmp_path / "models").resolve)
    (from_pack,) = depth_anything(ctx, image=image, ckpt_name="depth_anything_vits14.pth", resolution=70)
    (reference,) = depth_anything(ctx, image=image, ckpt_name="converted.safetensors", resolution=518)
    assert torch.allclose(from_pack, reference, atol=1e-5)
    assert float((from_pack - reference).abs().max()) < 1e-4 and float(reference.std()) > 0.01
    pack = load_depth_model(folder / "depth_anything_vits14.pth")
    assert pack.network.config.backbone_config.out_indices == [3, 4, 5, 6]  # V1: the last four of 6
    # the pack's pipeline: short side 518 whatever the resolution
    seen: list[torch.Size] = []
    handle = pack.network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True)
    try:
        for resolution in (64, 1024):
            depth_anything(ctx, image=image, ckpt_name="depth_anything_vits14.pth", resolution=resolution)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 3, 518, 756])] * 2  # 30 x 44 -> 518 x 759.7, to multiples of 14


def test_v2_takes_its_fixed_layers_and_refuses_a_depth_it_has_none_for(tmp_path: Path) -> None:
    from diffsplit.engine.models.depth_pack import pack_config

    network = pack_sized_network()
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(original_layout(network), path)
    with pytest.raises(ModelFileError, match="12- or 24-layer backbone, not a 6-layer one"):
        load_depth_model(path, version=2)
    shapes = {key: tuple(value.shape) for key, value in original_layout(network).items()}
    for i in range(6, 12):  # the same widths, 12 blocks: V2's ViT-S layer choice
        for key in [k for k in shapes if k.startswith("pretrained.blocks.0.")]:
            shapes[key.replace("blocks.0.", f"blocks.{i}.")] = shapes[key]
    assert pack_config(shapes, 2, "twelve")["backbone_config"]["out_indices"] == [3, 6, 9, 12]
    assert pack_config(shapes, 1, "twelve")["backbone_config"]["out_indices"] == [9, 10, 11, 12]


def test_pack_checkpoints_that_do_not_fit_or_are_too_large_are_refused(tmp_path: Path) -> None:
    state = original_layout(pack_sized_network())
    cases = [
        ({**state, "pretrained.blocks.0.mlp.fc2.weight": torch.zeros(128, 99)}, "do not fit"),
        ({**state, "pretrained.blocks.2.attn.qkv.weight": torch.zeros(380, 128)}, "do not fit"),
        ({**state, "pretrained.cls_token": torch.zeros(1, 1, 40)}, "not a DINOv2 backbone"),
        ({**state, "pretrained.cls_token": torch.zeros(1, 1, 0)}, "non-empty sides"),
        ({**state, "pretrained.pos_embed": torch.zeros(1, 0, 128)}, "non-empty sides"),
        ({**state, "pretrained.pos_embed": torch.zeros(128)}, "3-d pretrained.pos_embed"),
        ({**state, "pretrained.blocks.3000.x": torch.zeros(1)}, "3001 blocks"),
        ({**state, "pretrained.blocks.99999999.x": torch.zeros(1)}, "do not fit"),  # not a block index
        ({k: v for k, v in state.items() if k != "depth_head.scratch.layer1_rn.weight"},
         "needs a 4-d depth_head.scratch.layer1_rn.weight"),
        ({**state, "depth_head.projects.0.weight": torch.zeros(10**6, 1, 1, 1)}, "over the limit"),
        # a pickle keeps strides: one stored element claiming 128 x 10^6 must not be expanded
        ({**state, "depth_head.projects.0.weight": torch.zeros(1).expand(128, 10**6)},
         "not a plain dense tensor"),
    ]
    for index, (bad, reason) in enumerate(cases):
        path = tmp_path / f"bad{index}.pth"
        torch.save(bad, path)
        with pytest.raises(ModelFileError, match=reason):
            load_depth_model(path)
