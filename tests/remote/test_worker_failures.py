"""Worker failure modes: missing models, uploads, refusals, a worker that dies mid-request."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.base import InputSpec, NodeClass, OutputSpec
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.offload import RemoteNodeError, RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.engine.types import DiffusionModel
from diffsplit.transport.protocol import Settings
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import MissingModel

from diffsplit.demo import READY_PREFIX, local_worker


def split_run(models_dir: Path, out: Path, document: dict, remote: list[str], *, registry=None,
              upload: bool = False, settings: Settings | None = None):
    registry = registry or default_registry()
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, output_dir=out, max_workers=1)
    assigned = assign_remotes(workflow, registry, remote)
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                      upload_missing=upload, settings=settings) as runner:
        return executor.run(workflow, node_runner=runner), runner


def worker_command(models: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models),
            "--listen", "tcp://127.0.0.1:*", *extra]


def start_worker(models: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(worker_command(models, *extra), stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(READY_PREFIX), line
    return process, line[len(READY_PREFIX):].split()[0]


@pytest.fixture
def empty_store(tmp_path: Path) -> Path:
    store = tmp_path / "worker-models"
    (store / "checkpoints").mkdir(parents=True)
    return store


def test_missing_model_is_a_structured_error_naming_the_file(
    models_dir: Path, empty_store: Path, tmp_path: Path
) -> None:
    with local_worker(empty_store) as address, pytest.raises(NodeFailed) as caught:
        split_run(models_dir, tmp_path / "out", sd15_workflow(lora=False), [f"KSampler={address}"])
    error = caught.value.__cause__
    assert isinstance(error, RemoteNodeError)
    assert isinstance(error, MissingModel)  # the worker's typed error, decoded on the client
    assert error.kind == "MissingModel"
    assert error.name.endswith("tiny-sd15.safetensors") and error.error["name"] == error.name
    assert len(error.sha256) == 64 and error.size == (models_dir / "checkpoints" / "tiny-sd15.safetensors"
                                                       ).stat().st_size


def test_missing_model_is_uploaded_once_when_the_worker_allows(
    models_dir: Path, empty_store: Path, tmp_path: Path
) -> None:
    process, address = start_worker(empty_store, "--allow-upload", "--insecure")
    try:
        _result, runner = split_run(models_dir, tmp_path / "out", sd15_workflow(lora=False),
                                   [f"KSampler={address}"], upload=True)
        assert runner.stats["6"].uploads == 1
        uploaded = empty_store / "checkpoints" / "tiny-sd15.safetensors"
        original = models_dir / "checkpoints" / "tiny-sd15.safetensors"
        assert uploaded.read_bytes() == original.read_bytes()
        _again, runner = split_run(models_dir, tmp_path / "out2", sd15_workflow(lora=False),
                                  [f"KSampler={address}"], upload=True)
        assert runner.stats["6"].uploads == 0
    finally:
        process.terminate()
        process.wait(20)


def test_model_without_recipe_is_refused_before_anything_is_sent(
    models_dir: Path, empty_store: Path, tmp_path: Path
) -> None:
    def scale_weights(ctx, model: DiffusionModel, factor: float):
        return (dataclasses.replace(model),)  # a new object that no loader explains

    custom = NodeClass(
        name="MysteryModelPatch",
        inputs=(InputSpec("model", "MODEL"), InputSpec("factor", "FLOAT", default=1.0)),
        outputs=(OutputSpec("MODEL", "MODEL"),),
        function=scale_weights,
    )
    registry = default_registry().with_nodes(custom)
    document = sd15_workflow(lora=False)
    document["20"] = {"class_type": "MysteryModelPatch", "inputs": {"model": ["1", 0], "factor": 2.0}}
    document["6"]["inputs"]["model"] = ["20", 0]
    with local_worker(empty_store) as address:
        with pytest.raises(NodeFailed, match="not offloadable"):
            split_run(models_dir, tmp_path / "out", document, [f"KSampler={address}"], registry=registry)
        with Client(address) as client:
            stats = client.request({"op": "stats"}, timeout=10)
    assert stats["cache"]["misses"] == 0, "the worker must not have been asked to build anything"


def test_worker_killed_mid_request_gives_a_clear_error_within_the_heartbeat_timeout(
    models_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(heartbeat_interval=0.2, heartbeat_timeout=2.0)
    process, address = start_worker(models_dir)
    document = sd15_workflow(lora=False, steps=400)
    progress = threading.Event()
    killer = threading.Thread(target=lambda: progress.wait(60) and os.kill(process.pid, signal.SIGKILL))
    killer.start()
    registry = default_registry()
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, output_dir=tmp_path, max_workers=1,
                        progress=lambda node_id, step, total: progress.set())
    assigned = assign_remotes(workflow, registry, [f"KSampler={address}"])
    try:
        with RemoteRunner(assigned, output_recipe_source(workflow, registry, store),
                          settings=settings) as runner, pytest.raises(NodeFailed) as caught:
            executor.run(workflow, node_runner=runner)
        assert "KSampler" in str(caught.value)
        assert address in str(caught.value)
    finally:
        killer.join(60)
        process.kill()
        process.wait(20)
    assert process.returncode == -signal.SIGKILL


def test_sigterm_lets_the_worker_stop_cleanly(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(models_dir / "checkpoints", copy / "checkpoints")
    process, _ = start_worker(copy)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
