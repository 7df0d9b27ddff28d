"""``diffsplit run`` against workers that die: a SIGKILLed worker is reported, ``--fallback local``
finishes the run here, a second worker takes over from a dead first; the image is the local one.

Everything is real: ``diffsplit worker`` and ``diffsplit run`` child processes on loopback,
the tiny model set, PNG files compared pixel for pixel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from diffsplit.engine.example_workflows import sd15_workflow

from diffsplit.demo import READY_PREFIX

from .conftest import png_pixels, write_json

#: Enough steps that the worker is still sampling when it is killed after the first one.
STEPS = 12
#: A generous bound on noticing the kill (the default heartbeat timeout is 2.5 s); no tight timing.
DETECTION_BOUND_S = 10.0
WAIT_S = 240.0
#: The progress line of the sampler's first step (stderr is not a terminal: first and last steps only).
FIRST_STEP = re.compile(r"\s*node\s+6 \[[#-]+\] 1/")
#: How the client says a worker fell silent (the run's error, or the warning before a fallback).
GONE = re.compile(r"PeerGone|no message from")


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "diffsplit.cli", *(str(arg) for arg in args)]


def start_worker(models: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(cli("worker", "--models", models, "--listen", "tcp://127.0.0.1:*"),
                               stdout=subprocess.PIPE, text=True)
    return process


def worker_address(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(READY_PREFIX), line
    return line[len(READY_PREFIX):].split()[0]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


@pytest.fixture
def worker(models_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = start_worker(models_dir)
    try:
        yield process, worker_address(process)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_json(tmp_path_factory.mktemp("wf") / "sd15.json", sd15_workflow(lora=False, steps=STEPS))


@pytest.fixture(scope="module")
def local_pixels(
    workflow_file: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    out = tmp_path_factory.mktemp("local")
    done = subprocess.run(cli("run", workflow_file, "--models", models_dir, "--out", out, "-q"),
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    return png_pixels(next(out.glob("*.png")))


@dataclass(frozen=True)
class Finished:
    """A ``diffsplit run`` child that ran to its end, and when its worker was killed."""

    code: int
    stdout: str
    stderr: str
    detection_s: float | None  # from the kill to the first line naming the worker as gone

    @property
    def saved(self) -> Path:
        return Path(next(line for line in self.stdout.splitlines() if line.endswith(".png")))


def run_and_kill(args: list[str | Path], on_sampling: Callable[[], None] | None) -> Finished:
    """Run ``diffsplit run``; when the remote KSampler reports its first step, call ``on_sampling``."""
    run = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None and run.stdout is not None
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(run.stdout), name="test-run-stdout")
    reader.start()
    lines: list[str] = []
    killed_at = reported_at = None
    try:
        for line in run.stderr:
            lines.append(line)
            if killed_at is None and on_sampling is not None and FIRST_STEP.match(line):
                on_sampling()
                killed_at = time.monotonic()
            elif killed_at is not None and reported_at is None and GONE.search(line):
                reported_at = time.monotonic()
        code = run.wait(WAIT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        reader.join(30)
    detection = None if killed_at is None or reported_at is None else reported_at - killed_at
    return Finished(code, "".join(stdout), "".join(lines), detection)


def sigkill(process: subprocess.Popen[str]) -> Callable[[], None]:
    return lambda: os.kill(process.pid, signal.SIGKILL)


def test_run_reports_a_sigkilled_worker(
    worker, workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    process, address = worker
    finished = run_and_kill(["run", workflow_file, "--models", models_dir, "--out", tmp_path,
                             "--remote", f"KSampler={address}"], sigkill(process))
    assert finished.detection_s is not None, finished.stderr
    print(f"\nSIGKILLed worker reported {finished.detection_s:.2f} s after the kill")
    assert finished.code == 1, finished.stderr
    error = [line for line in finished.stderr.splitlines() if line.startswith("diffsplit run: error:")]
    assert len(error) == 1, finished.stderr
    assert "KSampler" in error[0] and address in error[0] and "no message" in error[0]
    assert finished.detection_s < DETECTION_BOUND_S
    assert process.wait(30) == -signal.SIGKILL


def test_fallback_local_finishes_a_run_whose_worker_was_killed(
    worker, workflow_file: Path, models_dir: Path, tmp_path: Path, local_pixels: np.ndarray
) -> None:
    process, address = worker
    stats = tmp_path / "stats.json"
    finished = run_and_kill(["run", workflow_file, "--models", models_dir, "--out", tmp_path / "out",
                             "--remote", f"KSampler={address}", "--fallback", "local", "--stats", stats],
                            sigkill(process))
    assert finished.detection_s is not None, finished.stderr
    print(f"\nSIGKILLed worker noticed {finished.detection_s:.2f} s after the kill; the node ran here")
    assert finished.code == 0, finished.stderr
    assert "running it here" in finished.stderr  # the warning says what happened
    assert json.loads(stats.read_text())["nodes"]["6"]["where"] == "fallback"
    assert np.array_equal(png_pixels(finished.saved), local_pixels)


def test_a_second_worker_serves_when_the_first_is_dead(
    worker, workflow_file: Path, models_dir: Path, tmp_path: Path, local_pixels: np.ndarray
) -> None:
    _, alive = worker
    first = start_worker(models_dir)
    dead = worker_address(first)
    stop(first)  # its port is closed now: nothing answers there
    stats = tmp_path / "stats.json"
    finished = run_and_kill(["run", workflow_file, "--models", models_dir, "--out", tmp_path / "out",
                             "--remote", f"KSampler={dead},{alive}", "--stats", stats], None)
    assert finished.code == 0, finished.stderr
    assert dead in finished.stderr and "unavailable" in finished.stderr
    recorded = json.loads(stats.read_text())
    assert recorded["nodes"]["6"]["where"] == "remote"
    assert recorded["remote"]["6"]["address"] == alive
    assert np.array_equal(png_pixels(finished.saved), local_pixels)
