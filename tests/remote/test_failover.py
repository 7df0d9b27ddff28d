"""Worker faults on the client: a gone or overloaded worker hands the node to the next one, or to here.

Real parts: a worker daemon in a child process (``worker_address``), a port
nobody listens on (a dead worker), and a transport ``Server`` that answers every
request ``Overloaded`` (a worker whose queue is full), all on loopback.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import LOCAL, RemoteNodeError, RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.transport.errors import TransportError
from diffsplit.transport.protocol import Settings
from diffsplit.transport.server import Request, Server

#: Short heartbeats so a dead worker is noticed quickly (roomy enough for a loaded machine).
FAST = Settings(heartbeat_interval=0.2, heartbeat_timeout=1.5)
DOCUMENT = sd15_workflow(lora=False, steps=2)


def dead_address() -> str:
    """A loopback port that nothing listens on (bound once, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


class RefusingWorker:
    """A real server that answers every request ``Overloaded``, recording the request ids it saw."""

    def __init__(self) -> None:
        self.server = Server(settings=FAST)
        self.address = self.server.endpoint
        self.request_ids: list[str] = []
        self._thread = threading.Thread(target=self._serve, name="diffsplit-test-refusing", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                request = self.server.recv(timeout=0.1)
            except TransportError:
                return
            if request is not None:
                self._answer(request)

    def _answer(self, request: Request) -> None:
        self.request_ids.append(request.request_id)
        error = {"kind": "Overloaded", "message": "the queue is full"}
        self.server.reply(request, {"op": "error", "error": error})

    def close(self) -> None:
        self.server.close()
        self._thread.join(10)


@pytest.fixture
def refusing() -> Iterator[RefusingWorker]:
    worker = RefusingWorker()
    yield worker
    worker.close()


def run(models_dir: Path, out: Path, registry: NodeRegistry, remote: list[str] | None = None,
        **options: Any) -> tuple[RunResult, RemoteRunner | None]:
    store = ModelStore(models_dir)
    workflow = load_workflow(DOCUMENT, registry)
    executor = Executor(registry, store, output_dir=out, max_workers=1)
    if remote is None:
        return executor.run(workflow), None
    assigned = assign_remotes(workflow, registry, remote)
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                      settings=FAST, **options) as runner:
        return executor.run(workflow, node_runner=runner), runner


@pytest.fixture(scope="module")
def local_image(models_dir: Path, registry: NodeRegistry, tmp_path_factory: pytest.TempPathFactory):
    result, _ = run(models_dir, tmp_path_factory.mktemp("local"), registry)
    return result.outputs["7"][0]


def test_a_dead_first_worker_hands_the_node_to_the_next(
    models_dir: Path, registry: NodeRegistry, worker_address: str, local_image: torch.Tensor,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    dead = dead_address()
    with caplog.at_level(logging.INFO, logger="diffsplit.engine.offload"):
        result, runner = run(models_dir, tmp_path, registry,
                             [f"KSampler={dead},{worker_address}", f"VAEDecode={dead},{worker_address}"])
    assert runner is not None
    assert runner.placement("6") == worker_address and runner.placement("7") == worker_address
    assert runner.stats["6"].address == worker_address
    assert torch.equal(result.outputs["7"][0], local_image)
    about_dead = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
    # the dead worker does not answer status, so it goes last and the live one takes both nodes;
    # its silence is remembered, so the second node does not ask (or wait on) it again
    assert sum("did not answer status" in text for text in about_dead) == 1, about_dead
    assert not any("unavailable:" in text for text in about_dead), "the node was never sent to it"


def test_a_dead_only_worker_fails_the_node_naming_it(
    models_dir: Path, registry: NodeRegistry, tmp_path: Path
) -> None:
    dead = dead_address()
    with pytest.raises(NodeFailed) as caught:
        run(models_dir, tmp_path, registry, [f"KSampler={dead}"])
    message = str(caught.value)
    assert "KSampler" in message and dead in message and "no message" in message


def test_fallback_local_runs_a_node_whose_worker_is_dead(
    models_dir: Path, registry: NodeRegistry, local_image: torch.Tensor, tmp_path: Path
) -> None:
    result, runner = run(models_dir, tmp_path, registry, [f"KSampler={dead_address()}"], fallback_local=True)
    assert runner is not None and runner.placement("6") == LOCAL
    assert runner.stats == {}  # nothing ran remotely
    assert torch.equal(result.outputs["7"][0], local_image)


def test_an_overloaded_worker_hands_the_node_to_the_next(
    models_dir: Path, registry: NodeRegistry, worker_address: str, refusing: RefusingWorker,
    local_image: torch.Tensor, tmp_path: Path,
) -> None:
    result, runner = run(models_dir, tmp_path, registry, [f"KSampler={refusing.address},{worker_address}"])
    assert runner is not None and runner.placement("6") == worker_address
    assert len(refusing.request_ids) == 1
    assert torch.equal(result.outputs["7"][0], local_image)


def test_overloaded_without_another_worker_is_the_workers_error_or_runs_here(
    models_dir: Path, registry: NodeRegistry, refusing: RefusingWorker, local_image: torch.Tensor,
    tmp_path: Path,
) -> None:
    with pytest.raises(NodeFailed) as caught:
        run(models_dir, tmp_path / "a", registry, [f"KSampler={refusing.address}"])
    error = caught.value.__cause__
    assert isinstance(error, RemoteNodeError)
    assert error.kind == "Overloaded" and refusing.address in str(error)
    result, runner = run(models_dir, tmp_path / "b", registry, [f"KSampler={refusing.address}"],
                         fallback_local=True)
    assert runner is not None and runner.placement("6") == LOCAL
    assert torch.equal(result.outputs["7"][0], local_image)
    assert len(set(refusing.request_ids)) == len(refusing.request_ids) == 2  # a new id for each request


def test_all_workers_failing_names_each(
    models_dir: Path, registry: NodeRegistry, refusing: RefusingWorker, tmp_path: Path
) -> None:
    dead = dead_address()
    with pytest.raises(NodeFailed) as caught:
        run(models_dir, tmp_path, registry, [f"KSampler={dead},{refusing.address}"])
    message = str(caught.value)
    assert "no worker could run it" in message
    assert dead in message and "PeerGone" in message
    assert refusing.address in message and "Overloaded" in message
