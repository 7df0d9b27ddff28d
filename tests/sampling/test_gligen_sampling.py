"""GLIGEN boxes at sampling time: they steer the tiny SD 1.5 model, and leave the shared MODEL unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.checkpoint import CheckpointParts, load_checkpoint
from diffsplit.engine.models.gligen import MAX_OBJECTS, GligenModel, load_gligen
from diffsplit.engine.models.safetensors_io import save_file_sorted
from diffsplit.engine.models.tiny_gligen import TINY_GLIGEN_FILE
from diffsplit.engine.nodes.conditioning import clip_text_encode
from diffsplit.engine.nodes.gligen import gligen_textbox_apply
from diffsplit.engine.sampling.gligen import GligenMismatch, gligen_patch
from diffsplit.engine.sampling.ksampler import sample_latent
from safetensors.torch import load_file


class _Context:
    node_id = "12"


@pytest.fixture(scope="module")
def sd15(models_dir: Path) -> CheckpointParts:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def gligen_file(models_dir: Path) -> Path:
    return models_dir / "gligen" / TINY_GLIGEN_FILE


@pytest.fixture(scope="module")
def gligen(gligen_file: Path) -> GligenModel:
    return load_gligen(gligen_file)


def _prompt(parts: CheckpointParts, text: str) -> list[list[Any]]:
    (conditioning,) = clip_text_encode(_Context(), text=text, clip=parts.clip)
    return conditioning


def _boxed(parts: CheckpointParts, gligen: GligenModel, conditioning: list[list[Any]]) -> list[list[Any]]:
    (once,) = gligen_textbox_apply(_Context(), conditioning_to=conditioning, clip=parts.clip,
                                   gligen_textbox_model=gligen, text="a bottle", width=24, height=40,
                                   x=8, y=16)
    (twice,) = gligen_textbox_apply(_Context(), conditioning_to=once, clip=parts.clip,
                                    gligen_textbox_model=gligen, text="sun", width=16, height=16, x=40, y=0)
    return twice


def _sample(parts: CheckpointParts, positive: list[list[Any]], *, cfg: float = 7.0,
            sampler: str = "uni_pc_bh2") -> torch.Tensor:
    negative = _prompt(parts, "blurry")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return sample_latent(parts.model, seed=5, steps=3, cfg=cfg, sampler_name=sampler, scheduler="normal",
                         positive=positive, negative=negative, latent=latent)["samples"]


def _model_state(parts: CheckpointParts) -> list[tuple[str, int, int, bool]]:
    unet = parts.model.unet
    modules = [(f"module:{name}", id(module), len(module._forward_hooks) + len(module._forward_pre_hooks),
                hasattr(module, "fuser")) for name, module in unet.named_modules()]
    tensors = [(name, tensor.data_ptr(), tensor._version, tensor.requires_grad)
               for name, tensor in unet.state_dict().items()]
    return modules + tensors


def test_boxes_change_the_sample_and_the_shared_model_is_unchanged_afterwards(
    sd15: CheckpointParts, gligen: GligenModel
) -> None:
    positive = _prompt(sd15, "a landscape")
    before_state = _model_state(sd15)
    plain = _sample(sd15, positive)
    boxed = _sample(sd15, _boxed(sd15, gligen, positive))
    assert not torch.allclose(plain, boxed, atol=1e-2)
    assert _model_state(sd15) == before_state
    assert not hasattr(sd15.model.unet, "position_net")
    assert torch.equal(_sample(sd15, positive), plain)  # a later plain run gives the original result


def test_gates_at_zero_give_the_sample_without_gligen(
    sd15: CheckpointParts, gligen_file: Path, tmp_path: Path
) -> None:
    tensors = load_file(gligen_file)
    for key in tensors:
        if key.endswith((".alpha_attn", ".alpha_dense")):
            tensors[key] = torch.zeros(())
    save_file_sorted(tensors, tmp_path / "gates-off.safetensors")
    gates_off = load_gligen(tmp_path / "gates-off.safetensors")
    positive = _prompt(sd15, "a landscape")
    boxed = _boxed(sd15, gates_off, positive)
    # cfg 1 runs the positive entry alone either way: the same computation, bit for bit
    assert torch.equal(_sample(sd15, boxed, cfg=1.0), _sample(sd15, positive, cfg=1.0))
    # with cfg the boxed entry runs apart from the negative one (ComfyUI's rule): batch-size rounding only
    assert torch.allclose(_sample(sd15, boxed, cfg=7.0), _sample(sd15, positive, cfg=7.0), atol=1e-2)


def test_an_entry_with_boxes_runs_alone_never_batched_with_the_negative(
    sd15: CheckpointParts, gligen: GligenModel
) -> None:
    batches: list[int] = []
    conv_in = sd15.model.unet.conv_in
    handle = conv_in.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    try:
        positive = _prompt(sd15, "a landscape")
        _sample(sd15, positive, sampler="euler")
        plain_batches, batches[:] = list(batches), []
        _sample(sd15, _boxed(sd15, gligen, positive), sampler="euler")
    finally:
        handle.remove()
    assert plain_batches == [2, 2, 2]
    assert batches == [1, 1] * 3


def test_object_tokens_place_boxes_as_fractions_of_the_latent_crop(
    sd15: CheckpointParts, gligen: GligenModel
) -> None:
    embedding = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    patch = gligen_patch(sd15.model, ("position", gligen, [(embedding, 5, 3, 4, 6)]))  # h, w, y, x
    assert patch is not None
    tokens = patch.object_tokens((2, 4, 12, 16))
    assert tokens.shape == (2, MAX_OBJECTS, 64) and torch.equal(tokens[0], tokens[1])
    boxes = torch.zeros(1, MAX_OBJECTS, 4)
    boxes[0, 0] = torch.tensor((6 / 16, 4 / 12, 9 / 16, 9 / 12))  # x1, y1, x2, y2
    masks = torch.zeros(1, MAX_OBJECTS)
    masks[0, 0] = 1
    texts = torch.zeros(1, MAX_OBJECTS, 64)
    texts[0, 0] = embedding[0]
    assert torch.equal(tokens[:1], gligen.position_net(boxes, masks, texts))
    assert not torch.allclose(tokens[0, 0], tokens[0, 1])
    assert torch.equal(tokens[0, 1], tokens[0, -1])  # unused slots: the null features
    empty = gligen_patch(sd15.model, ("empty", gligen, []))
    assert empty is not None and torch.equal(empty.object_tokens((1, 4, 12, 16))[0, 0], tokens[0, 1])


def test_a_gligen_file_for_another_unet_is_refused_at_sampling_naming_the_file(
    sd15: CheckpointParts, gligen_file: Path, tmp_path: Path
) -> None:
    tensors = load_file(gligen_file)
    fewer = {key: value for key, value in tensors.items() if not key.startswith("middle_block.")}
    save_file_sorted(fewer, tmp_path / "fewer.safetensors")
    positive = _boxed(sd15, load_gligen(tmp_path / "fewer.safetensors"), _prompt(sd15, "a landscape"))
    with pytest.raises(GligenMismatch, match=r"'fewer\.safetensors' does not fit this MODEL.*10 transformer "
                                             r"blocks, the model has 11.*middle_block\.1"):
        _sample(sd15, positive)
    swapped = {key.replace("input_blocks.1.1.", "@").replace("input_blocks.4.1.", "input_blocks.1.1.")
               .replace("@", "input_blocks.4.1."): value for key, value in tensors.items()}
    save_file_sorted(swapped, tmp_path / "swapped.safetensors")
    positive = _boxed(sd15, load_gligen(tmp_path / "swapped.safetensors"), _prompt(sd15, "a landscape"))
    with pytest.raises(GligenMismatch, match=r"fuser of input_blocks\.1\.1\.transformer_blocks\.0 is for 64 "
                                             r"channels.*block has 32 channels in 8 heads"):
        _sample(sd15, positive)


def test_malformed_gligen_values_are_refused(sd15: CheckpointParts, gligen: GligenModel) -> None:
    pooled = torch.zeros(1, 64)
    with pytest.raises(GligenMismatch, match="unknown gligen kind 'boxes'"):
        gligen_patch(sd15.model, ("boxes", gligen, []))
    with pytest.raises(GligenMismatch, match="not GLIGEN"):
        gligen_patch(sd15.model, ("position", sd15.model.unet, []))
    with pytest.raises(GligenMismatch, match="32-value text embedding; the GLIGEN model takes 64"):
        gligen_patch(sd15.model, ("position", gligen, [(torch.zeros(1, 32), 1, 1, 0, 0)]))
    with pytest.raises(GligenMismatch, match="must be integers"):
        gligen_patch(sd15.model, ("position", gligen, [(pooled, 1.5, 1, 0, 0)]))
    with pytest.raises(GligenMismatch, match="at most 30 boxes"):
        gligen_patch(sd15.model, ("position", gligen, [(pooled, 1, 1, 0, 0)] * 31))
