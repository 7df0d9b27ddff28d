"""Session-wide fixtures: offline mode and one tiny model set per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI-style models folder with the tiny seeded model set (built once)."""
    from diffsplit.engine.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root, seed=0)
    return root
