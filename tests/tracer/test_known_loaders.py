"""Known loaders: resolved lazily by name, seen through decorators, classified per call."""

from __future__ import annotations

import inspect

import torch
from diffsplit.tracer.known_loaders import (
    KNOWN_FUNCTIONS,
    OPS,
    KnownFunction,
    classify_call,
    describe_function,
    resolve_known_functions,
)
from diffusers import DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers import EulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import PreTrainedModel


def test_decorated_library_functions_are_watched_by_their_inner_code() -> None:
    watched = resolve_known_functions()
    wrapper = DiffusionPipeline.__dict__["from_pretrained"].__func__
    assert wrapper.__code__ not in watched  # huggingface's validate_hf_hub_args wrapper, shared by many
    inner = inspect.unwrap(wrapper).__code__
    assert watched[inner].spec.op == "diffusers.from_pretrained"
    assert inspect.unwrap(ModelMixin.__dict__["from_pretrained"].__func__).__code__ in watched
    assert PreTrainedModel.__dict__["from_pretrained"].__func__.__code__ in watched
    assert load_file.__code__ in watched


def test_every_lora_mixin_is_watched() -> None:
    watched = resolve_known_functions()
    for mixin in (StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin):
        code = inspect.unwrap(mixin.__dict__["load_lora_weights"]).__code__
        assert watched[code].spec.op == "diffusers.load_lora_weights"


def test_every_known_operation_is_in_the_rebuild_allowlist() -> None:
    assert {spec.op for spec in KNOWN_FUNCTIONS} <= set(OPS)


def _resolved(function: object, classify: str, owner: str | None = None) -> object:
    spec = KnownFunction(
        "x:y", "torch.to", "placement", owner_param=owner, subject_param="self", classify=classify
    )
    return describe_function(function, spec, "f")


def test_module_to_is_a_mutator_only_with_a_dtype() -> None:
    resolved = _resolved(torch.nn.Module.to, "dtype_change")
    assert classify_call(resolved, {"args": (torch.float16,), "kwargs": {}}) == (
        "mutator",
        {"dtype": torch.float16},
    )
    assert classify_call(resolved, {"args": ("cpu",), "kwargs": {"dtype": torch.bfloat16}})[1] == {
        "dtype": torch.bfloat16
    }
    assert classify_call(resolved, {"args": ("cpu",), "kwargs": {}}) == ("placement", {})


def test_from_config_is_a_loader_for_schedulers_only() -> None:
    spec = KnownFunction(
        "x:y", "diffusers.from_config", "loader", owner_param="cls", classify="scheduler_only"
    )
    resolved = describe_function(lambda cls, config: None, spec, "from_config")
    assert classify_call(resolved, {"cls": EulerDiscreteScheduler, "config": {}}) == ("loader", {})
    assert classify_call(resolved, {"cls": UNet2DConditionModel, "config": {}}) is None
