"""Fixtures for split runs: a real worker process on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import write_example_inputs
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry

from diffsplit.demo import local_worker


@pytest.fixture(scope="module")
def worker_address(models_dir: Path) -> Iterator[str]:
    """A worker daemon in a child process serving the tiny model set."""
    with local_worker(models_dir) as address:
        yield address


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    """The built-in node classes."""
    return default_registry()


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inputs folder with a control image for LoadImage."""
    return write_example_inputs(tmp_path_factory.mktemp("input"))
