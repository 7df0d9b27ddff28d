"""Fingerprints, weight snapshots, and object paths."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffsplit.engine.types import DiffusionModel, TextEncoders
from diffsplit.tracer.fingerprint import SAMPLES_PER_TENSOR, WeightSnapshot, fingerprint, tensor_sample
from diffsplit.tracer.objects import find_path, get_path, named_tensors


def make_net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_same_weights_give_the_same_fingerprint_and_edits_change_it() -> None:
    net = make_net()
    twin = copy.deepcopy(net)
    assert fingerprint(net) == fingerprint(twin)
    with torch.no_grad():
        twin[0].weight.add_(1e-3)
    assert fingerprint(net) != fingerprint(twin)
    assert fingerprint(net) != fingerprint(make_net(seed=1))


def test_fingerprint_covers_dtype_and_reads_only_a_sample() -> None:
    net = make_net()
    half = copy.deepcopy(net).to(torch.float16)
    assert fingerprint(net) != fingerprint(half)
    big = torch.arange(10_000, dtype=torch.float32)
    assert len(tensor_sample(big)) == SAMPLES_PER_TENSOR * 4


def test_snapshot_names_what_changed() -> None:
    net = make_net()
    snapshot = WeightSnapshot.take(net)
    assert snapshot.changes(net) == []
    with torch.no_grad():
        net[0].bias.mul_(2)
    net[2].weight = torch.nn.Parameter(net[2].weight.detach().clone())
    net.register_buffer("extra", torch.zeros(1))
    findings = snapshot.changes(net)
    assert "0.bias was modified in place" in findings
    assert "2.weight was replaced" in findings
    assert "extra was added" in findings


def test_snapshot_of_a_part_is_compared_by_its_path() -> None:
    model = DiffusionModel(unet=make_net(), family="sd15")
    snapshot = WeightSnapshot.take((model, "other output"))
    assert snapshot.changes(model.unet, at="0.unet") == []
    del model.unet[2]
    assert snapshot.changes(model.unet, at="0.unet") == ["2.weight was removed", "2.bias was removed"]


def test_paths_reach_into_dataclasses_tuples_and_modules() -> None:
    encoder = make_net()
    clip = TextEncoders(encoders=(make_net(), encoder), tokenizers=(), family="sdxl")
    outputs = (DiffusionModel(unet=make_net(), family="sdxl"), clip)
    assert find_path(outputs, encoder) == "1.encoders.1"
    assert find_path(outputs, encoder[2]) == "1.encoders.1.2"
    assert get_path(outputs, "1.encoders.1.2") is encoder[2]
    assert find_path(outputs, make_net()) is None
    assert [path for path, _ in named_tensors(clip)][:2] == ["encoders.0.0.weight", "encoders.0.0.bias"]


def test_peft_adapter_weights_and_activity_are_in_the_fingerprint(models_dir: Path) -> None:
    """set_adapters weights live in no tensor: without them a wrong weight would pass the worker's check."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(models_dir / "diffusers" / "tiny-sd15", subfolder="unet")
    for name in ("a", "b"):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False),
                         adapter_name=name)
    unet.set_adapters(["a", "b"], weights=[1.0, 1.0])
    both = fingerprint(unet)
    unet.set_adapters(["a", "b"], weights=[1.0, 0.5])
    half = fingerprint(unet)
    unet.set_adapters(["a"], weights=[1.0])
    only_a = fingerprint(unet)
    unet.set_adapters(["a", "b"], weights=[1.0, 0.5])
    assert len({both, half, only_a}) == 3 and fingerprint(unet) == half
    unet.set_adapters(["a"], weights=[1.0])
    unet.set_adapters(["a"], weights=[1.0])  # b inactive: its scaling no longer counts
    assert fingerprint(unet) == only_a
    unet.disable_adapters()
    assert fingerprint(unet) != only_a
