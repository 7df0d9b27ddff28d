"""``--device`` and ``--dtype``: which device, and which dtype each model kind computes in.

The device tests that need a machine without CUDA (or MPS) skip elsewhere: on a
GPU machine ``cuda`` resolves instead of failing.
"""

from __future__ import annotations

import pytest
import torch
from diffsplit.engine.devices import (
    DEVICE_CHOICES,
    DeviceError,
    available_devices,
    bf16_supported,
    default_budget_bytes,
    resolve_device,
)
from diffsplit.engine.dtypes import (
    MODEL_KINDS,
    DtypeError,
    DtypePolicy,
    dtype_name,
    parse_dtype,
)

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
no_mps = pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")


def kinds(policy: DtypePolicy) -> dict[str, torch.dtype]:
    return {kind: policy.of(kind) for kind in MODEL_KINDS}


# -- dtypes -----------------------------------------------------------------------------------------


def test_auto_on_the_cpu_keeps_every_kind_float32() -> None:
    policy = DtypePolicy.auto(CPU)
    assert kinds(policy) == dict.fromkeys(MODEL_KINDS, torch.float32)
    assert policy.all_float32
    assert DtypePolicy.choose(CPU) == policy


def test_auto_on_mps_halves_the_models_but_keeps_the_vae_float32() -> None:
    """MPS has no native bfloat16, so the VAE (which overflows in float16) stays float32; no MPS needed."""
    policy = DtypePolicy.auto(torch.device("mps"))
    assert kinds(policy) == {"unet": torch.float16, "vae": torch.float32, "text_encoder": torch.float16,
                             "controlnet": torch.float16, "other": torch.float32}
    assert not policy.all_float32


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             ("fp32", torch.float32)])
def test_dtype_sets_every_kind(name: str, dtype: torch.dtype) -> None:
    policy = DtypePolicy.choose(CPU, dtype=name)
    assert kinds(policy) == dict.fromkeys(MODEL_KINDS, dtype)
    assert policy.describe() == " ".join(f"{kind}={name}" for kind in MODEL_KINDS)


def test_per_kind_flags_override_dtype() -> None:
    policy = DtypePolicy.choose(CPU, dtype="fp16", vae="fp32", text_encoder="bf16")
    assert kinds(policy) == {"unet": torch.float16, "vae": torch.float32, "text_encoder": torch.bfloat16,
                             "controlnet": torch.float16, "other": torch.float16}


def test_unet_dtype_also_sets_the_controlnet_when_dtype_is_auto() -> None:
    policy = DtypePolicy.choose(CPU, unet="bf16")
    assert policy.unet == torch.bfloat16
    assert policy.controlnet == torch.bfloat16  # it adds into the UNet: it follows its dtype
    assert (policy.vae, policy.text_encoder, policy.other) == (torch.float32,) * 3


def test_unet_dtype_leaves_the_controlnet_to_an_explicit_dtype() -> None:
    policy = DtypePolicy.choose(CPU, dtype="fp16", unet="bf16")
    assert policy.unet == torch.bfloat16
    assert policy.controlnet == torch.float16


@pytest.mark.parametrize(("flag", "options"), [
    ("--dtype", {"dtype": "half"}),
    ("--unet-dtype", {"unet": "float16"}),
    ("--vae-dtype", {"vae": "fp8"}),
    ("--text-encoder-dtype", {"text_encoder": ""}),
])
def test_bad_dtype_names_raise_naming_the_flag(flag: str, options: dict[str, str]) -> None:
    with pytest.raises(DtypeError) as caught:
        DtypePolicy.choose(CPU, **options)
    message = str(caught.value)
    assert message.startswith(f"{flag} ")
    assert "auto, fp32, fp16, bf16" in message


def test_parse_dtype_ignores_case_and_space_and_auto_is_none() -> None:
    assert parse_dtype(" FP16 ") == torch.float16
    assert parse_dtype("Bf16") == torch.bfloat16
    assert parse_dtype("auto") is None
    assert [dtype_name(dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)] == [
        "fp32", "fp16", "bf16"]
    assert dtype_name(torch.float64) == "float64"


# -- devices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu "])
def test_cpu_resolves(spec: str) -> None:
    assert resolve_device(spec) == CPU


def test_auto_takes_cuda_then_mps_then_the_cpu() -> None:
    expected = torch.device("cuda", 0) if HAS_CUDA else torch.device("mps") if HAS_MPS else CPU
    assert resolve_device("auto") == expected


@no_cuda
@no_mps
def test_auto_is_the_cpu_without_an_accelerator() -> None:
    assert resolve_device("auto") == CPU
    assert available_devices() == "available: cpu"


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1", "CUDA:7"])
def test_cuda_without_cuda_lists_what_is_available(spec: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert repr(spec) in message
    assert "no CUDA device" in message
    assert "available: cpu" in message


@no_mps
def test_mps_without_mps_lists_what_is_available() -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device("mps")
    assert "MPS is not available" in str(caught.value)
    assert "available: cpu" in str(caught.value)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:", "cuda:1234", "cpu:0", "", "auto cpu", "cuda:-1"])
def test_unknown_device_names_raise_naming_the_accepted_values(spec: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert message.startswith(f"unknown device {spec!r}")
    assert DEVICE_CHOICES in message
    assert DEVICE_CHOICES == "auto, cpu, cuda, cuda:N, mps"


def test_the_cpu_has_no_budget_and_no_native_bf16() -> None:
    assert default_budget_bytes(CPU) is None
    assert default_budget_bytes(torch.device("mps")) is None
    assert not bf16_supported(CPU)
    assert not bf16_supported(torch.device("mps"))
