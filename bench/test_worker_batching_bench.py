"""A worker serving 8 clients at once: ``--batch-max 1`` (off) against ``--batch-max 8``.

Eight clients (``DIFFSPLIT_BENCH_CLIENTS``), each on its own thread and connection, send ``REQUESTS`` tiny
SD 1.5 KSampler requests one after another (own seeds, CFG scales and prompt
embeddings; euler, ``STEPS`` steps, 8x8 latents) to one worker process with one
slot. With batching off the slot serves them one by one; with ``--batch-max 8``
it gathers the queued compatible ones and samples them in lockstep (one UNet
pass per step). Rows alternate for ``ROUNDS`` rounds and keep their fastest;
the ratio is off / on from the same run, and the worker's ``stats`` say how
many batches ran and how many UNet passes served how many calls. Nothing
asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_worker_batching_bench.py -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.transport.sockets import Client

from diffsplit.demo import local_worker

CLIENTS = int(os.environ.get("DIFFSPLIT_BENCH_CLIENTS", "8"))
REQUESTS = 3
STEPS = 8
ROUNDS = 3


@pytest.fixture(scope="module")
def fresh_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching-models")
    subprocess.run([sys.executable, "-m", "diffsplit.cli", "models", "tiny", str(root)], check=True,
                   capture_output=True, timeout=600)
    return root


@pytest.fixture(scope="module")
def workers(fresh_models: Path) -> Iterator[dict[str, str]]:
    with local_worker(fresh_models, extra_args=["--threads", "2"]) as off, \
            local_worker(fresh_models, extra_args=["--threads", "2", "--batch-max", str(CLIENTS),
                                                   "--batch-wait-ms", "20"]) as on:
        yield {"batch off": off, f"batch-max {CLIENTS}": on}


def _request(recipe: dict[str, Any], client: int, n: int) -> dict[str, Any]:
    prompt = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(client * 100 + n))
    return {
        "op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
        "inputs": {
            "model": {"$ds:model": recipe}, "seed": client * 100 + n, "steps": STEPS, "cfg": 4.0 + client,
            "sampler_name": "euler", "scheduler": "normal", "positive": [[prompt, {}]],
            "negative": [[torch.zeros(1, 77, 64), {}]], "latent_image": {"samples": torch.zeros(1, 4, 8, 8)},
            "denoise": 1.0,
        },
    }


def _serve_all(address: str, recipe: dict[str, Any]) -> float:
    errors: list[str] = []

    def client_run(client: int) -> None:
        with Client(address) as connection:
            for n in range(REQUESTS):
                reply = connection.request(_request(recipe, client, n), timeout=300)
                if reply.get("op") != "result":
                    errors.append(str(reply))

    threads = [threading.Thread(target=client_run, args=(c,)) for c in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    return time.perf_counter() - started


def test_worker_batching_throughput(benchmark: Any, fresh_models: Path, workers: dict[str, str]) -> None:
    registry = default_registry()
    workflow = load_workflow(sd15_workflow(lora=False), registry)
    recipe = output_recipe_source(workflow, registry, ModelStore(fresh_models))("1", 0)
    assert recipe is not None
    for address in workers.values():
        _serve_all(address, recipe)  # warm: models built and cached on both workers
    best: dict[str, float] = {}

    def measure() -> None:
        for _ in range(ROUNDS):
            for name, address in workers.items():
                seconds = _serve_all(address, recipe)
                best[name] = min(best.get(name, seconds), seconds)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    total = CLIENTS * REQUESTS
    off = best["batch off"]
    print(f"\n{CLIENTS} clients x {REQUESTS} KSampler requests ({STEPS} steps, 8x8), one slot "
          f"(fastest of {ROUNDS}):")
    for name, seconds in best.items():
        with Client(workers[name]) as client:
            stats = client.request({"op": "stats"}, timeout=30)["batching"]
        benchmark.extra_info[name] = {"seconds": seconds, "requests_per_s": total / seconds, "stats": stats}
        print(f"  {name:<12} {seconds:6.2f} s  {total / seconds:5.2f} req/s  {off / seconds:4.2f}x  "
              f"batches {stats['batches']}, UNet passes {stats['unet_passes']} for "
              f"{stats['unet_calls_asked']} calls")
