"""The worker's own ops and limits over a real socket: hello, stats, echo, Overloaded, bad requests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.transport.sockets import Client

from diffsplit.demo import READY_PREFIX


@pytest.fixture(scope="module")
def busy_worker(models_dir: Path) -> Iterator[str]:
    """A worker with one slot and no queue, so a second request at once is Overloaded."""
    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
               "--listen", "tcp://127.0.0.1:*", "--slots", "1", "--max-queue", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith(READY_PREFIX), line
    yield line[len(READY_PREFIX):].split()[0]
    process.terminate()
    process.wait(20)


def sampler_request(models_dir: Path, steps: int) -> dict:
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    recipe = output_recipe_source(workflow, registry, ModelStore(models_dir))("1", 0)
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
        "inputs": {
            "model": {"$ds:model": recipe}, "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": conditioning, "negative": conditioning,
            "latent_image": {"samples": {"$ds:zeros": {"shape": [1, 4, 8, 8], "dtype": "float32"}}},
            "denoise": 1.0,
        },
    }


def test_hello_stats_and_echo(busy_worker: str) -> None:
    with Client(busy_worker) as client:
        hello = client.request({"op": "hello"}, timeout=10)
        assert hello["worker"]["slots"] == 1 and not hello["worker"]["allow_upload"]
        assert set(client.request({"op": "stats"}, timeout=10)["cache"]) >= {"hits", "misses", "bytes"}
        echo = client.request({"op": "echo", "reply_bytes": 1000, "data": b"x" * 5000}, timeout=10)
        assert echo["data"] == bytes(1000)
        refused = client.request({"op": "echo", "reply_bytes": -1}, timeout=10)
        assert refused["op"] == "error" and refused["error"]["kind"] == "BadRequest"


def test_unknown_op_and_malformed_run_node_are_bad_requests(busy_worker: str) -> None:
    with Client(busy_worker) as client:
        unknown = client.request({"op": "format_disk"}, timeout=10)
        assert unknown["error"]["kind"] == "BadRequest" and "format_disk" in unknown["error"]["message"]
        no_node = client.request({"op": "run_node", "inputs": {}}, timeout=10)
        assert no_node["error"]["kind"] == "BadRequest"
        nope = {"op": "run_node", "node": {"id": "1", "class_type": "Nope"}, "inputs": {}}
        bad_class = client.request(nope, timeout=10)
        assert "Nope" in bad_class["error"]["message"]
        output = client.request({"op": "run_node", "node": {"id": "9", "class_type": "SaveImage"},
                                 "inputs": {}}, timeout=10)
        assert "output node" in output["error"]["message"]


def test_second_request_beyond_slots_and_queue_is_overloaded(busy_worker: str, models_dir: Path) -> None:
    with Client(busy_worker) as client:
        long_one = client.submit(sampler_request(models_dir, steps=60))
        second = client.request(sampler_request(models_dir, steps=1), timeout=30)
        assert second["op"] == "error" and second["error"]["kind"] == "Overloaded"
        first = client.result(long_one, timeout=300)
        assert first["op"] == "result" and first["outputs"][0]["samples"].shape == (1, 4, 8, 8)
