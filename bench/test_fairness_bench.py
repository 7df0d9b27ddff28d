"""Fairness on one worker: the latency of a one-request-at-a-time client while another has 200 queued.

A worker process (one slot, ``--threads 1``, a queue of 256 with 240 of it open
to one client) serves two clients. The *flood* client submits ``FLOOD`` tiny
SD 1.5 KSampler requests at once; meanwhile the *single* client sends
``SINGLE`` requests one after another, each when the last came back, and its
latencies (submit to reply) are taken. The same single client alone, on the
idle worker, is the baseline from the same run. With the queue's round robin
per client the single client waits for at most the one flood job running when
it arrives: its p50 and p99 should be near one job's time more than alone, not
the flood's 200. The figures go to ``benchmark.extra_info`` and are printed;
nothing asserts a time.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_fairness_bench.py -s
"""

from __future__ import annotations

import statistics
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

FLOOD = 200
SINGLE = 20
STEPS = 3


@pytest.fixture(scope="module")
def worker(models_dir: Path) -> Iterator[str]:
    with local_worker(models_dir, extra_args=["--threads", "1", "--max-queue", "256",
                                              "--max-queue-per-client", "240"]) as address:
        yield address


def _request(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    zeros = [[torch.zeros(1, 77, 64), {}]]
    return {"op": "run_node", "node": {"id": "6", "class_type": "KSampler"},
            "inputs": {"model": {"$ds:model": recipe}, "seed": seed, "steps": STEPS, "cfg": 5.0,
                       "sampler_name": "euler", "scheduler": "normal", "positive": zeros, "negative": zeros,
                       "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}, "denoise": 1.0}}


def _single_latencies(address: str, recipe: dict[str, Any]) -> list[float]:
    latencies = []
    with Client(address) as client:
        for n in range(SINGLE):
            started = time.perf_counter()
            reply = client.request(_request(recipe, 10_000 + n), timeout=600)
            latencies.append(time.perf_counter() - started)
            assert reply["op"] == "result", reply
    return latencies


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def test_one_request_client_beside_a_client_with_200_queued(benchmark: Any, models_dir: Path,
                                                            worker: str) -> None:
    registry = default_registry()
    recipe = output_recipe_source(load_workflow(sd15_workflow(lora=False), registry), registry,
                                  ModelStore(models_dir))("1", 0)
    assert recipe is not None
    _single_latencies(worker, recipe)  # warm: the UNet built and cached
    figures: dict[str, Any] = {}

    def measure() -> None:
        alone = _single_latencies(worker, recipe)
        flood_done: list[float] = []
        with Client(worker) as flood:
            ids = [flood.submit(_request(recipe, n)) for n in range(FLOOD)]
            flood_started = time.perf_counter()
            waiter = threading.Thread(target=lambda: flood_done.extend(
                [flood.result(request_id, timeout=1200) and time.perf_counter() for request_id in ids]))
            waiter.start()
            loaded = _single_latencies(worker, recipe)
            waiter.join()
        figures.update(alone=alone, loaded=loaded, flood_s=flood_done[-1] - flood_started)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    alone, loaded = figures["alone"], figures["loaded"]
    job = statistics.median(alone)
    report = {
        "alone_p50_s": job, "alone_p99_s": _percentile(alone, 0.99),
        "loaded_p50_s": statistics.median(loaded), "loaded_p99_s": _percentile(loaded, 0.99),
        "flood_requests": FLOOD, "flood_s": figures["flood_s"],
    }
    benchmark.extra_info.update(report)
    print(f"\none client sending {SINGLE} requests one by one, another with {FLOOD} queued "
          f"(KSampler {STEPS} steps, 8x8, one slot):")
    ms = {name: value * 1000 for name, value in report.items() if name.endswith("_s")}
    print(f"  alone:        p50 {ms['alone_p50_s']:6.1f} ms  p99 {ms['alone_p99_s']:6.1f} ms")
    print(f"  beside flood: p50 {ms['loaded_p50_s']:6.1f} ms  p99 {ms['loaded_p99_s']:6.1f} ms"
          f"  ({report['loaded_p50_s'] / job:4.2f}x / {report['loaded_p99_s'] / job:4.2f}x the job alone)")
    print(f"  the flood's {FLOOD} requests took {report['flood_s']:.1f} s "
          f"({report['flood_s'] / FLOOD * 1000:.1f} ms each)")
    assert len(loaded) == SINGLE
