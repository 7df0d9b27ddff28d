"""``diffsplit demo``: the whole idea on one machine, with no downloads.

1. writes the tiny seeded model set (once) into ``DIR/models``;
2. starts a worker daemon in a child process on a free loopback port;
3. runs the embedded SD 1.5 + LoRA workflow with KSampler and VAEDecode on the
   worker, then again all-local, and checks the two images are identical;
4. prints where the image is and what crossed the wire.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from diffsplit.transport.errors import DiffsplitError

READY_PREFIX = "diffsplit worker listening on "
DEMO_WORKFLOW = "demo_sd15.json"
REMOTE_CLASSES = ("KSampler", "VAEDecode")


class DemoError(DiffsplitError):
    """The demo could not run to the end."""


def demo_workflow() -> dict:
    """The embedded demo workflow (API format)."""
    text = resources.files("diffsplit").joinpath("workflows", DEMO_WORKFLOW).read_text()
    return json.loads(text)


@contextlib.contextmanager
def local_worker(models: Path, *, timeout_s: float = 120.0, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """A worker daemon in a child process on a free loopback port; yields its address.

    ``extra_args`` go to ``diffsplit worker`` as they are (``--dtype fp16``, ``--slots 2``...).
    """
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models),
               "--listen", "tcp://127.0.0.1:*", "--cache-gb", "2", "--grace", "5", *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        address = _wait_ready(process, timeout_s)
        yield address
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """SIGTERM ``process`` (a worker drains and exits), SIGKILL it if it is not gone in ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise DemoError(f"the worker exited before it was ready (exit code {process.wait()})")
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX):].split()[0]
    raise DemoError(f"the worker was not ready within {timeout_s} s")


def run_demo(directory: Path, *, local_only: bool = False) -> int:
    """Run the demo in ``directory``; returns a process exit code."""
    from diffsplit.cli import main as cli_main
    from diffsplit.engine.models.tiny import write_tiny_models

    models = directory / "models"
    if not (models / "checkpoints" / "tiny-sd15.safetensors").exists():
        print(f"writing tiny models into {models}")
        write_tiny_models(models, seed=0)
    workflow_path = directory / "demo_sd15.json"
    workflow_path.write_text(json.dumps(demo_workflow(), indent=2) + "\n")
    local_out, split_out = directory / "local", directory / "split"
    base = ["run", str(workflow_path), "--models", str(models)]
    print("== all local")
    if cli_main([*base, "--out", str(local_out)]) != 0:
        return 1
    if local_only:
        return 0
    with local_worker(models) as address:
        print(f"== split: {', '.join(REMOTE_CLASSES)} on the worker at {address}")
        remotes = [f"--remote={cls}={address}" for cls in REMOTE_CLASSES]
        stats_path = directory / "split-stats.json"
        if cli_main([*base, "--out", str(split_out), *remotes, "--stats", str(stats_path)]) != 0:
            return 1
    local_image, split_image = _newest_png(local_out), _newest_png(split_out)
    same = np.array_equal(np.asarray(Image.open(local_image)), np.asarray(Image.open(split_image)))
    stats = json.loads(stats_path.read_text())
    for node_id, node in stats["remote"].items():
        print(f"  node {node_id} {node['class_type']}: sent {node['request_bytes']:,} B "
              f"(recipes {node['recipe_bytes']:,} B), received {node['reply_bytes']:,} B, "
              f"rebuild {node['rebuild_s']:.2f}s, run {node['run_s']:.2f}s")
    print(f"image: {split_image}")
    print("split == local: " + ("yes, pixel for pixel" if same else "NO"))
    return 0 if same else 1


def _newest_png(folder: Path) -> Path:
    images = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    if not images:
        raise DemoError(f"no image was written to {folder}")
    return images[-1]
