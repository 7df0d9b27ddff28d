"""Time-sharing: per-client FIFOs served round robin, in isolation and inside a real worker."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.remote.fair_queue import FairQueue, QueueClosed
from diffsplit.transport.sockets import Client

from diffsplit.demo import READY_PREFIX


def test_clients_take_turns_and_keep_their_own_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3"):
        queue.put("a", item)
    queue.put("b", "b1")
    queue.put("c", "c1")
    queue.put("b", "b2")
    assert [queue.get(timeout=1) for _ in range(6)] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert queue.get(timeout=0.01) is None


def test_close_hands_back_what_waits_and_wakes_takers() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.put("a", 1)
    queue.put("b", 2)
    results: list[object] = []

    def taker() -> None:
        try:
            while True:
                results.append(queue.get(timeout=5))
        except QueueClosed:
            results.append("closed")

    assert queue.get(timeout=1) == 1
    assert queue.close() == [2]
    thread = threading.Thread(target=taker)
    thread.start()
    thread.join(5)
    assert results == ["closed"]
    with pytest.raises(QueueClosed):
        queue.put("a", 3)


def sampler_request(models_dir: Path, steps: int, seed: int) -> dict:
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    recipe = output_recipe_source(workflow, registry, ModelStore(models_dir))("1", 0)
    conditioning = [[torch.zeros(1, 77, 64), {}]]
    return {
        "op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
        "inputs": {
            "model": {"$ds:model": recipe}, "seed": seed, "steps": steps, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": conditioning,
            "negative": conditioning,
            "latent_image": {"samples": {"$ds:zeros": {"shape": [1, 4, 8, 8], "dtype": "float32"}}},
            "denoise": 1.0,
        },
    }


def test_a_second_client_is_served_before_the_first_clients_backlog(models_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models_dir),
         "--listen", "tcp://127.0.0.1:*", "--slots", "1"], stdout=subprocess.PIPE, text=True)
    finished: list[str] = []
    lock = threading.Lock()
    try:
        address = process.stdout.readline()[len(READY_PREFIX):].split()[0]
        with Client(address) as warm:  # build the model once so every job costs about the same
            warm.request(sampler_request(models_dir, 1, 0), timeout=120)
        with Client(address) as busy, Client(address) as polite:
            backlog = [busy.submit(sampler_request(models_dir, 30, seed)) for seed in range(3)]
            late = polite.submit(sampler_request(models_dir, 30, 99))

            def wait(client: Client, request_id: str, name: str) -> None:
                assert client.result(request_id, timeout=300)["op"] == "result"
                with lock:
                    finished.append(name)

            waiters = [threading.Thread(target=wait, args=(busy, request_id, f"a{n}"))
                       for n, request_id in enumerate(backlog)]
            waiters.append(threading.Thread(target=wait, args=(polite, late, "b")))
            for thread in waiters:
                thread.start()
            for thread in waiters:
                thread.join(300)
    finally:
        process.terminate()
        process.wait(20)
    assert finished.index("b") < finished.index("a2"), f"round robin, not FIFO: {finished}"
