"""Ctrl-C and SIGTERM end to end: runs stop at the next step, workers stop their jobs and keep serving.

Each test runs the real ``diffsplit`` command in a child process and signals
it once the sampler has started (its first progress line), so nothing here
depends on timing guesses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.transport.sockets import Client

from diffsplit.demo import local_worker

from ..remote.test_worker_protocol import sampler_request
from .conftest import write_json

#: Steps that take minutes here: a run that is not stopped does not finish within the tests' waits.
LONG_STEPS = 10_000
STOP_WITHIN_S = 30


@pytest.fixture(autouse=True)
def sigint_not_ignored() -> object:
    """A suite started in the background (``cmd &``) ignores SIGINT, and an ignored signal stays ignored in
    the runs started here: they would never see the Ctrl-C. Handled in this process, it is the default
    (Python's KeyboardInterrupt) in theirs."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def long_workflow(tmp_path: Path) -> Path:
    document = sd15_workflow(steps=LONG_STEPS, lora=False)
    document["5"]["inputs"].update(width=256, height=256)
    return write_json(tmp_path / "long.json", document)


def start_run(workflow: Path, models: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "diffsplit.cli", "run", str(workflow), "--models", str(models),
               "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_sampling(process: subprocess.Popen[str]) -> list[str]:
    """Read stderr until the sampler's first progress line (the bar) appears."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if f"/{LONG_STEPS}" in line:
            return seen
    raise AssertionError(f"the run ended before sampling: {''.join(seen)}")


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, rest = process.communicate(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"the run did not stop within {STOP_WITHIN_S} s") from None
    return process.returncode, rest


def test_ctrl_c_stops_a_local_sampler_at_its_next_step_with_exit_130(
    models_dir: Path, tmp_path: Path
) -> None:
    process = start_run(long_workflow(tmp_path), models_dir, tmp_path / "out")
    wait_for_sampling(process)
    process.send_signal(signal.SIGINT)
    code, stderr = finish(process)
    assert code == 130, stderr
    assert stderr.strip().endswith("interrupted") and "Traceback" not in stderr


def test_a_second_ctrl_c_while_stopping_does_not_abort(models_dir: Path, tmp_path: Path) -> None:
    process = start_run(long_workflow(tmp_path), models_dir, tmp_path / "out")
    wait_for_sampling(process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    code, stderr = finish(process)
    assert code == 130, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr


def test_ctrl_c_cancels_a_remote_sampler_on_its_worker_which_keeps_serving(
    models_dir: Path, tmp_path: Path
) -> None:
    with local_worker(models_dir) as address:
        process = start_run(long_workflow(tmp_path), models_dir, tmp_path / "out",
                            "--remote", f"KSampler={address}")
        wait_for_sampling(process)
        process.send_signal(signal.SIGINT)
        code, stderr = finish(process)
        assert code == 130, stderr
        # one slot: this short job runs only once the cancelled one has stopped
        started = time.monotonic()
        with Client(address) as client:
            reply = client.request(sampler_request(models_dir, steps=1), timeout=STOP_WITHIN_S)
        assert reply["op"] == "result", reply
        assert time.monotonic() - started < STOP_WITHIN_S


def test_sigterm_during_a_job_cancels_it_and_the_worker_exits_cleanly(models_dir: Path) -> None:
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
               "--listen", "tcp://127.0.0.1:*", "--grace", "0.5"]
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    address = worker.stdout.readline().split("listening on ")[1].split()[0]
    sampling = threading.Event()
    replies: list[dict] = []

    def long_job() -> None:
        with Client(address) as client:
            replies.append(client.request(sampler_request(models_dir, steps=LONG_STEPS), timeout=120,
                                          on_progress=lambda _: sampling.set()))

    job = threading.Thread(target=long_job)
    job.start()
    assert sampling.wait(60), "the job never reported a step"
    worker.send_signal(signal.SIGTERM)
    try:
        _, stderr = worker.communicate(timeout=STOP_WITHIN_S + 30)
    finally:
        job.join(30)
    assert worker.returncode == 0, stderr
    assert "terminate called" not in stderr
    (reply,) = replies
    assert reply["op"] == "error" and reply["error"]["kind"] == "Cancelled"
    assert "stopped before the node finished" in reply["error"]["message"]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_node_failing_on_the_worker_shows_its_traceback_with_v(
    verbose: bool, run_cli, models_dir: Path, tmp_path: Path, worker_address: str
) -> None:
    document = sd15_workflow(steps=1, lora=False)
    document["3"]["inputs"]["clip"] = ["9", 1]  # SDXL text encoders for an SD 1.5 model: fails in the UNet
    document["4"]["inputs"]["clip"] = ["9", 1]
    document["9"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}}
    workflow = write_json(tmp_path / "mismatch.json", document)
    result = run_cli(*(["-v"] if verbose else []), "run", workflow, "--models", models_dir,
                     "--out", tmp_path / "out", "--remote", f"KSampler={worker_address}")
    assert result.exit_code == 1
    assert "NodeFailed" in result.stderr and "node 6 (KSampler)" in result.stderr
    if verbose:
        assert "the worker's traceback:" in result.stderr
        assert "Traceback (most recent call last)" in result.stderr
    else:
        assert "run with -v to see the worker's traceback" in result.stderr
        assert "Traceback" not in result.stderr
