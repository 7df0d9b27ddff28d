"""Session-wide fixtures: offline mode and one tiny model set per test session."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
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


#: How long a test's threads get to finish after it before they count as leaked.
_THREAD_GRACE_S = 5.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a diffsplit thread running (an unclosed Client, Server, runner or pool).

    Every Client and Server owns an I/O thread; a thread still alive after the
    test means one of them was not closed. The process's connection pool keeps
    connections nobody leases for the next lease: they are closed first (a test
    is a process's whole life), so only a lease never given back counts.
    """
    from diffsplit.transport.pool import shared_pool

    before = set(threading.enumerate())
    yield
    shared_pool().close_idle()
    deadline = time.monotonic() + _THREAD_GRACE_S
    while True:
        leaked = [t for t in threading.enumerate()
                  if t not in before and t.is_alive() and t.name.startswith("diffsplit")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {sorted(t.name for t in leaked)}"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The test computes on one intra-op thread (its count restored after)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
