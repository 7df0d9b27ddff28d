"""Input categories: normal values, intermediate tensors and containers, models, and errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pytest
import torch
from diffsplit.engine.types import ControlHint, ControlNet, DiffusionModel, TextEncoders, Vae
from diffsplit.tracer.categories import categorize, embedded_models
from diffsplit.tracer.errors import UncategorizedInput


class Mode(enum.Enum):
    FAST = "fast"


@dataclass(frozen=True)
class Wrapped:
    """An unregistered dataclass holding only a module: a model by structure."""

    net: torch.nn.Module
    name: str


def small_unet() -> torch.nn.Module:
    return torch.nn.Conv2d(4, 4, 1)


@pytest.mark.parametrize(
    "value",
    [
        None,
        3,
        2.5,
        "euler",
        True,
        Mode.FAST,
        torch.float16,
        [1, 2, 3],
        {"steps": 20, "names": ["a", "b"]},
        (1, "x"),
    ],
)
def test_plain_values_are_normal(value: object) -> None:
    assert categorize(value) == "normal"


def test_tensors_and_comfy_containers_are_intermediate() -> None:
    latent = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [0]}
    conditioning = [[torch.zeros(1, 77, 64), {"pooled_output": torch.zeros(1, 64)}]]
    assert categorize(torch.zeros(2)) == "intermediate"
    assert categorize(latent) == "intermediate"
    assert categorize(conditioning) == "intermediate"
    assert categorize(torch.Generator().manual_seed(1)) == "intermediate"


def test_modules_and_engine_models_are_models() -> None:
    unet = small_unet()
    assert categorize(unet) == "model"
    assert categorize(DiffusionModel(unet=unet, family="sd15")) == "model"
    assert categorize(Vae(model=unet, scaling_factor=0.18)) == "model"
    assert categorize(TextEncoders(encoders=(unet,), tokenizers=(), family="sd15")) == "model"
    assert categorize(Wrapped(unet, "x")) == "model"
    assert categorize([unet, unet]) == "model"


def test_registered_model_types_are_models_even_without_modules() -> None:
    @dataclass(frozen=True)
    class Handle:
        key: str

    assert categorize(Handle("a"), model_types=(Handle,)) == "model"
    assert categorize(Handle("a")) == "normal"


def test_a_control_hint_is_intermediate_and_its_controlnet_is_found() -> None:
    controlnet = ControlNet(model=small_unet())
    hint = ControlHint(controlnet=controlnet, image=torch.zeros(1, 64, 64, 3), strength=0.9)
    conditioning = [[torch.zeros(1, 77, 64), {"control": hint, "control_apply_to_uncond": True}]]
    assert categorize(conditioning) == "intermediate"
    assert list(embedded_models(conditioning)) == [("0.1.control.controlnet", controlnet)]


def test_chained_hints_yield_each_controlnet_once() -> None:
    first, second = ControlNet(model=small_unet()), ControlNet(model=small_unet())
    inner = ControlHint(controlnet=first, image=torch.zeros(1), strength=1.0)
    outer = ControlHint(controlnet=second, image=torch.zeros(1), strength=1.0, previous=inner)
    found = dict(embedded_models([[torch.zeros(1), {"control": outer}]]))
    assert found == {"0.1.control.controlnet": second, "0.1.control.previous.controlnet": first}


def test_unknown_types_raise_an_error_naming_the_input_and_type() -> None:
    with pytest.raises(UncategorizedInput) as caught:
        categorize(lambda x: x, name="callback", where="denoise")
    assert caught.value.input_name == "callback"
    assert caught.value.type_name == "function"
    assert "denoise: input 'callback' is a function" in str(caught.value)


def test_unknown_types_nested_in_containers_are_errors_too() -> None:
    with pytest.raises(UncategorizedInput, match="object"):
        categorize({"latent": torch.zeros(1), "extra": object()}, name="samples")
