"""Session-wide fixtures: offline mode and one tiny model set per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer files and other caches go to a session folder, not the user's home."""
    folder = tmp_path_factory.mktemp("diffsplit-cache")
    os.environ["DIFFSPLIT_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI-style models folder with the tiny seeded model set (built once)."""
    from diffsplit.engine.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root, seed=0)
    return root
