"""``diffsplit batch --ray`` on a real local Ray instance (``ray.init(num_cpus=3)``), not a mock.

The module's Ray instance serves the in-process CLI runs (the command joins a
running instance); the interrupted run is its own process with its own local
instance (``--ray local``), stopped with a real SIGINT. Images are checked
against ``diffsplit run`` bit for bit (one item per sampling call), a sampling
actor killed mid-batch is restarted by Ray with every item still accounted
for, and an interrupted batch resumes without redoing what finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffsplit.engine.example_workflows import sd15_workflow

from .conftest import CliRun, png_pixels, write_json

ray = pytest.importorskip("ray")

#: How long a killed actor, or a stopped run, may take (an actor restart imports torch again).
WAIT_S = 120


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "wf.json", sd15_workflow(steps=2, lora=True))


def write_items(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{n}", "prompt": f"prompt {n}", "seed": 50 + n}) + "\n"
                            for n in range(count)), encoding="utf-8")
    return path


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# These come first: the module's Ray instance is not started yet.
@pytest.mark.parametrize("flags", [("--ahead", "3"), ("--priority", "2"), ("--fallback", "local")])
def test_flags_that_steer_workers_are_refused_with_ray(
    run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
    flags: tuple[str, ...],
) -> None:
    items = write_items(tmp_path / "items.jsonl", 1)
    done = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir,
                   "--out", tmp_path / "o", "-q", "--ray", "local", *flags)
    assert done.exit_code != 0 and f"{flags[0]} steer workers" in done.stderr
    assert not ray.is_initialized()


def test_ray_with_remote_workers_is_refused_before_ray_starts(
    run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items = write_items(tmp_path / "items.jsonl", 1)
    done = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir,
                   "--out", tmp_path / "o", "-q", "--ray", "local", "--remote", "6=tcp://127.0.0.1:1")
    assert done.exit_code != 0 and "give one or the other" in done.stderr
    assert not ray.is_initialized()


def test_a_cut_that_cannot_work_is_refused_before_ray_starts(
    run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items = write_items(tmp_path / "items.jsonl", 1)
    done = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir,
                   "--out", tmp_path / "o", "-q", "--ray", "local", "--ray-nodes", "8")
    assert done.exit_code != 0 and "output node cannot run in the sampling stage" in done.stderr
    assert not ray.is_initialized()


def test_each_item_equals_diffsplit_run_and_the_manifest_names_the_sampling_actor(
    ray_instance: None, run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = write_items(tmp_path / "items.jsonl", 3), tmp_path / "images"
    done = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir, "--out", out, "-q",
                   "--ray", "auto", "--ray-batch", "1")
    assert done.exit_code == 0, done.stderr
    lines = manifest_lines(out)
    assert sorted(line["item"] for line in lines) == ["p0", "p1", "p2"]
    for line in lines:
        assert line["status"] == "ok" and line["workers"]["6"].startswith("ray:")
        n = int(line["item"][1:])
        reference = run_cli("run", workflow_file, "--models", models_dir, "--out", tmp_path / f"ref{n}", "-q",
                            "--set", f"3.text=prompt {n}", "--set", f"6.seed={50 + n}")
        assert reference.exit_code == 0, reference.stderr
        assert np.array_equal(png_pixels(out / line["outputs"][0]), png_pixels(reference.saved[0])), n
        assert line["seed"] == 50 + n and line["times"]["sample_s"] > 0


def test_a_sampling_actor_killed_mid_batch_is_restarted_and_every_item_finishes(
    ray_instance: None, run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = write_items(tmp_path / "items.jsonl", 8), tmp_path / "images"
    killed: list[int] = []

    def kill_once_sampling() -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not killed:
            lines = manifest_lines(out)
            if lines:  # the actor has sampled a batch (its pid is in the line): kill it with the next in hand
                pid = int(lines[0]["workers"]["6"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once_sampling, name="test-actor-killer")
    killer.start()
    done = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir, "--out", out, "-q",
                   "--ray", "auto", "--ray-batch", "2", "--set", "6.steps=12")  # sampling is the slow part
    killer.join()
    assert done.exit_code == 0, done.stderr
    assert killed, "the sampling actor was never seen alive"
    lines = manifest_lines(out)
    assert sorted(line["item"] for line in lines) == [f"p{n}" for n in range(8)]  # none lost, none twice
    assert all(line["status"] == "ok" for line in lines)
    pids = {int(line["workers"]["6"].rsplit(":", 1)[1]) for line in lines}
    assert len(pids) == 2 and killed[0] in pids, pids  # items before the kill, and after the restart


def test_an_interrupted_batch_resumes_without_redoing_finished_items(
    ray_instance: None, run_cli: Callable[..., CliRun], workflow_file: Path, models_dir: Path, tmp_path: Path,
) -> None:
    items, out = write_items(tmp_path / "items.jsonl", 12), tmp_path / "images"
    previous = signal.getsignal(signal.SIGINT)  # a suite started with `cmd &` ignores SIGINT: not the run
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "diffsplit.cli", "batch", str(items), "--workflow", str(workflow_file),
             "--models", str(models_dir), "--out", str(out), "-q", "--ray", "local", "--ray-cpus", "2",
             "--ray-batch", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + WAIT_S
    while len(manifest_lines(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the batch did not stop on SIGINT") from None
    assert process.returncode == 130, stderr
    first = manifest_lines(out)
    assert 2 <= len(first) < 12, stderr
    again = run_cli("batch", items, "--workflow", workflow_file, "--models", models_dir, "--out", out, "-q",
                    "--ray", "auto")
    assert again.exit_code == 0, again.stderr
    assert f"{12 - len(first)} done, {len(first)} already done, 0 failed" in again.stderr
    lines = manifest_lines(out)
    assert sorted(line["item"] for line in lines) == sorted(f"p{n}" for n in range(12))  # each once
    assert all(line["status"] == "ok" for line in lines)
