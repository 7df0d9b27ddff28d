"""Benchmark fixtures: offline, a tiny model set, a worker process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny seeded model set, written once per session."""
    from diffsplit.engine.models.tiny import write_tiny_models

    os.environ.setdefault("DIFFSPLIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="session")
def worker_address(models_dir: Path) -> Iterator[str]:
    """A worker daemon in a child process."""
    from diffsplit.demo import local_worker

    with local_worker(models_dir) as address:
        yield address


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The module's benchmarks compute on one intra-op thread (the count restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 where there is none)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return 0
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="session")
def require_room() -> Callable[[Path, int, int], None]:
    """``require(folder, memory, disk)`` skips the asking benchmark unless ``memory`` bytes are available
    and ``disk`` bytes are free where ``folder`` lies (the full-size ones)."""

    def require(folder: Path, memory: int, disk: int) -> None:
        if _available_memory() < memory:
            pytest.skip(f"needs {memory >> 30} GiB of free memory")
        if shutil.disk_usage(folder).free < disk:
            pytest.skip(f"needs {disk >> 30} GiB of free disk")

    return require
