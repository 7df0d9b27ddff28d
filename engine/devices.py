"""Which device runs the models: ``--device auto|cpu|cuda|cuda:N|mps``, and its memory budget.

``auto`` takes the first CUDA device, else MPS, else the CPU. A device that
this machine does not have is refused with a message that says what it has.
The CUDA-only calls (free memory) are kept in :func:`cuda_free_bytes`; nothing
here initialises CUDA unless a CUDA device was asked for.
"""

from __future__ import annotations

import re

import torch
from diffsplit.engine.errors import EngineError

#: What ``--device`` accepts.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
#: Device memory kept free beside the budget by default (CUDA context, allocator slack, other processes).
DEFAULT_RESERVE_BYTES = 1 << 30


class DeviceError(EngineError):
    """A device that cannot be used: unknown name, not on this machine, or an index out of range."""


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec``; DeviceError names what was wrong and what this machine has."""
    text = spec.strip().lower()
    if not _DEVICE.fullmatch(text):
        raise DeviceError(f"unknown device {spec!r}: use one of {DEVICE_CHOICES}")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceError(f"device {spec!r}: MPS is not available here ({available_devices()})")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r}: no CUDA device is available here ({available_devices()})")
    index = int(text.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r}: this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def available_devices() -> str:
    """The devices this machine offers, for messages."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{n}" for n in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return "available: " + ", ".join(names)


def default_budget_bytes(device: torch.device, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int | None:
    """The device memory models and activations may use: free memory now minus ``reserve_bytes``.

    None (no budget) on the CPU and MPS, where memory is the process's own and the model cache's
    ``--cache-gb`` bounds it.
    """
    if device.type != "cuda":
        return None
    return max(0, cuda_free_bytes(device) - reserve_bytes)


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device as the driver reports it (CUDA only)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def measured_peak_bytes(device: torch.device) -> int | None:
    """The most memory torch's allocator held on ``device`` since start (CUDA only; None elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA: Ampere and later; the CPU emulates it)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
