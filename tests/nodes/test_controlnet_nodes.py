"""ControlNetLoader, ControlNetApply and ControlNetApplyAdvanced with the tiny SD 1.5 ControlNet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.models.checkpoint import load_checkpoint
from diffsplit.engine.nodes.controlnet import (
    CONTROLNET_APPLY,
    CONTROLNET_APPLY_ADVANCED,
    CONTROLNET_LOADER,
    NODES,
)
from diffsplit.engine.nodes.sampling import KSAMPLER
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import ControlHint, ControlNet, DiffusionModel
from diffusers import ControlNetModel

CONTROLNET_FILE = "tiny-sd15-controlnet.safetensors"


@dataclass
class StoreContext:
    """The parts of a NodeContext these nodes use: model files from a real store, progress."""

    store: ModelStore
    node_id: str = "5"
    reports: list[tuple[int, int]] = field(default_factory=list)

    def model_path(self, folder: str, name: str) -> Path:
        return self.store.resolve(folder, name)

    def progress(self, step: int, total: int) -> None:
        self.reports.append((step, total))


@pytest.fixture(autouse=True)
def single_thread(one_torch_thread: None) -> None:
    """Tiny models run fastest on one thread on a shared machine (``one_torch_thread``)."""


@pytest.fixture(scope="module")
def context(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StoreContext:
    index = tmp_path_factory.mktemp("controlnet-index") / "index.json"
    return StoreContext(ModelStore(models_dir, index_path=index))


@pytest.fixture(scope="module")
def sd15(models_dir: Path) -> DiffusionModel:
    return load_checkpoint(models_dir / "checkpoints" / "tiny-sd15.safetensors").model


@pytest.fixture(scope="module")
def control_net(context: StoreContext) -> ControlNet:
    (loaded,) = CONTROLNET_LOADER.function(context, control_net_name=CONTROLNET_FILE)
    return loaded


def _conditioning(seed: int) -> list[list[Any]]:
    cond = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed))
    return [[cond, {}]]


def _hint_image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def _sample(ctx: StoreContext, model: DiffusionModel, positive: Any, negative: Any) -> torch.Tensor:
    (latent,) = KSAMPLER.function(
        ctx, model=model, seed=11, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
        positive=positive, negative=negative, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0,
    )  # fmt: skip
    return latent["samples"]


def test_declarations_match_comfyui() -> None:
    assert [n.name for n in NODES] == ["ControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced"]
    (name_input,) = CONTROLNET_LOADER.inputs
    assert (name_input.name, name_input.type, name_input.model_folder) == (
        "control_net_name",
        "COMBO",
        "controlnet",
    )
    assert CONTROLNET_LOADER.is_loader and [o.type for o in CONTROLNET_LOADER.outputs] == ["CONTROL_NET"]
    assert [(s.name, s.type) for s in CONTROLNET_APPLY.inputs] == [
        ("conditioning", "CONDITIONING"), ("control_net", "CONTROL_NET"), ("image", "IMAGE"),
        ("strength", "FLOAT"),
    ]  # fmt: skip
    assert [(s.name, s.type) for s in CONTROLNET_APPLY_ADVANCED.inputs if not s.optional] == [
        ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("control_net", "CONTROL_NET"),
        ("image", "IMAGE"), ("strength", "FLOAT"), ("start_percent", "FLOAT"), ("end_percent", "FLOAT"),
    ]  # fmt: skip
    strength = CONTROLNET_APPLY.input("strength")
    assert strength is not None and (strength.default, strength.min, strength.max) == (1.0, 0.0, 10.0)
    assert [(o.name, o.type) for o in CONTROLNET_APPLY_ADVANCED.outputs] == [
        ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
    ]  # fmt: skip


def test_loader_builds_a_controlnet_from_the_store(control_net: ControlNet) -> None:
    assert isinstance(control_net, ControlNet) and isinstance(control_net.model, ControlNetModel)


def test_apply_attaches_a_chained_hint_without_touching_the_input(control_net: ControlNet) -> None:
    conditioning = _conditioning(1)
    image = _hint_image()
    (once,) = CONTROLNET_APPLY.function(
        None, conditioning=conditioning, control_net=control_net, image=image, strength=0.8
    )
    (twice,) = CONTROLNET_APPLY.function(
        None, conditioning=once, control_net=control_net, image=image, strength=0.5
    )
    assert conditioning[0][1] == {}
    hint = twice[0][1]["control"]
    assert isinstance(hint, ControlHint) and hint.strength == 0.5 and hint.previous is once[0][1]["control"]
    assert hint.previous.strength == 0.8 and hint.image is image
    assert (hint.start_percent, hint.end_percent) == (0.0, 1.0) and twice[0][1][
        "control_apply_to_uncond"
    ] is True
    assert twice[0][0] is conditioning[0][0]
    (unchanged,) = CONTROLNET_APPLY.function(
        None, conditioning=conditioning, control_net=control_net, image=image, strength=0.0
    )
    assert unchanged is conditioning


def test_apply_advanced_shares_one_hint_between_positive_and_negative(control_net: ControlNet) -> None:
    positive, negative = _conditioning(1), _conditioning(2)
    new_positive, new_negative = CONTROLNET_APPLY_ADVANCED.function(
        None, positive=positive, negative=negative, control_net=control_net, image=_hint_image(),
        strength=1.5, start_percent=0.2, end_percent=0.7,
    )  # fmt: skip
    hint = new_positive[0][1]["control"]
    assert new_negative[0][1]["control"] is hint
    assert (hint.strength, hint.start_percent, hint.end_percent, hint.previous) == (1.5, 0.2, 0.7, None)
    assert positive[0][1] == {} and negative[0][1] == {}
    same = CONTROLNET_APPLY_ADVANCED.function(
        None, positive=positive, negative=negative, control_net=control_net, image=_hint_image(),
        strength=0.0, start_percent=0.0, end_percent=1.0,
    )  # fmt: skip
    assert same[0] is positive and same[1] is negative


def test_strength_zero_is_no_control_and_one_is_not(
    context: StoreContext, sd15: DiffusionModel, control_net: ControlNet
) -> None:
    positive, negative = _conditioning(1), _conditioning(2)
    plain = _sample(context, sd15, positive, negative)
    results = {}
    for strength in (0.0, 1.0):
        (controlled,) = CONTROLNET_APPLY.function(
            None, conditioning=positive, control_net=control_net, image=_hint_image(), strength=strength
        )
        results[strength] = _sample(context, sd15, controlled, negative)
    assert torch.equal(results[0.0], plain)
    assert not torch.allclose(results[1.0], plain, atol=1e-3)


def test_percent_range_between_steps_is_no_control(
    context: StoreContext, sd15: DiffusionModel, control_net: ControlNet
) -> None:
    positive, negative = _conditioning(1), _conditioning(2)
    plain = _sample(context, sd15, positive, negative)

    def controlled(start: float, end: float) -> torch.Tensor:
        new_positive, new_negative = CONTROLNET_APPLY_ADVANCED.function(
            None, positive=positive, negative=negative, control_net=control_net, image=_hint_image(),
            strength=1.0, start_percent=start, end_percent=end,
        )  # fmt: skip
        return _sample(context, sd15, new_positive, new_negative)

    # 3 "normal" steps sample at timesteps 999, 499.5 and 0; 10%..30% lies between the first two.
    assert torch.equal(controlled(0.1, 0.3), plain)
    assert not torch.allclose(controlled(0.0, 0.3), plain, atol=1e-3)
    assert not torch.allclose(controlled(0.4, 0.6), plain, atol=1e-3)
