"""The measured device memory peak in DeviceMemory's stats: CUDA's allocator where there is one."""

from __future__ import annotations

import pytest
import torch
from diffsplit.engine.device_memory import DeviceMemory
from diffsplit.engine.dtypes import DtypePolicy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_on_the_cpu_no_peak_is_claimed_as_measured() -> None:
    cpu = torch.device("cpu")
    memory = DeviceMemory(cpu, DtypePolicy.choose(cpu, dtype="fp16"))
    module = torch.nn.Linear(64, 64)
    with memory.job(activation_bytes=1024, modules=[(module, torch.float16)], what="test"):
        placed = memory.place(module, "other")
        assert placed is not module and placed.weight.dtype == torch.float16
    stats = memory.stats()
    assert stats.measured_peak_bytes is None  # only the estimate exists on a CPU
    assert stats.peak_bytes >= 64 * 64 * 2 + 1024


@needs_cuda
def test_on_cuda_the_allocator_peak_covers_the_placed_copy() -> None:
    cuda = torch.device("cuda", 0)
    memory = DeviceMemory(cuda, DtypePolicy.choose(cuda, dtype="fp16"))
    module = torch.nn.Linear(1024, 1024)
    with memory.job(activation_bytes=0, modules=[(module, torch.float16)], what="test"):
        memory.place(module, "other")
    measured = memory.stats().measured_peak_bytes
    assert measured is not None and measured >= 1024 * 1024 * 2
