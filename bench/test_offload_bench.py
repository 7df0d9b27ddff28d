"""Offload costs: split/local time on loopback, wire bytes per sampler, cold vs warm worker.

Ratios are computed against baselines measured in the same run and stored in
``extra_info``; nothing here asserts a timing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow, sdxl_refiner_workflow
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source

ROUNDS = 5


def _setup(models_dir: Path, document: dict, tmp_path: Path):
    registry = default_registry()
    store = ModelStore(models_dir)
    workflow = load_workflow(document, registry)
    executor = Executor(registry, store, output_dir=tmp_path, max_workers=1)
    return registry, store, workflow, executor


def _best_of(function, rounds: int = ROUNDS) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def test_split_over_loopback_vs_all_local_warm_cache(benchmark, models_dir, worker_address, tmp_path) -> None:
    registry, store, workflow, executor = _setup(models_dir, sd15_workflow(steps=12), tmp_path)
    targets = ["7"]
    assigned = assign_remotes(workflow, registry, [f"KSampler={worker_address}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store)) as runner:
        executor.run(workflow, targets=targets, node_runner=runner)  # warm the worker's cache
        local = split = float("inf")
        for _ in range(ROUNDS):  # interleaved, so a busy moment hits both sides alike
            local = min(local, _best_of(lambda: executor.run(workflow, targets=targets), rounds=1))
            split = min(split, _best_of(
                lambda: executor.run(workflow, targets=targets, node_runner=runner), rounds=1))
        benchmark.pedantic(lambda: executor.run(workflow, targets=targets, node_runner=runner),
                           rounds=1, iterations=1)
        stats = runner.stats["6"]
    benchmark.extra_info.update({"local_s": local, "split_s": split, "split_over_local": split / local,
                                 "goal": "<= 1.05", "remote_rebuild_s": stats.rebuild_s})
    print(f"\nsplit/local (tiny SD1.5, 12 steps, warm cache, best of {ROUNDS} interleaved): "
          f"{split / local:.3f}x (local {local * 1000:.1f} ms, split {split * 1000:.1f} ms)")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_wire_bytes_per_offloaded_sampler(benchmark, family, models_dir, worker_address, tmp_path) -> None:
    document = sd15_workflow(steps=2) if family == "sd15" else sdxl_refiner_workflow()
    sampler = "6" if family == "sd15" else "9"
    registry, store, workflow, executor = _setup(models_dir, document, tmp_path)
    assigned = assign_remotes(workflow, registry, [f"{sampler}={worker_address}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store)) as runner:
        benchmark.pedantic(lambda: executor.run(workflow, node_runner=runner), rounds=1, iterations=1)
        stats = runner.stats[sampler]
    header_and_recipes = stats.request_bytes - stats.request_tensor_bytes
    ratio = stats.request_bytes / max(stats.request_tensor_bytes, 1)
    benchmark.extra_info.update({
        "request_bytes": stats.request_bytes, "request_tensor_bytes": stats.request_tensor_bytes,
        "recipe_bytes": stats.recipe_bytes, "reply_bytes": stats.reply_bytes,
        "reply_tensor_bytes": stats.reply_tensor_bytes, "request_over_tensors": ratio,
        "non_tensor_bytes": header_and_recipes,
    })
    print(f"\n{family} sampler request: {stats.request_bytes:,} B on the wire for "
          f"{stats.request_tensor_bytes:,} B of tensors ({ratio:.3f}x; header+recipes "
          f"{header_and_recipes:,} B, recipes {stats.recipe_bytes:,} B); reply {stats.reply_bytes:,} B "
          f"for {stats.reply_tensor_bytes:,} B of tensors")
    assert stats.request_tensor_bytes > 0


def test_cold_vs_warm_worker(benchmark, models_dir, tmp_path) -> None:
    from diffsplit.demo import local_worker

    registry, store, workflow, executor = _setup(models_dir, sd15_workflow(steps=2), tmp_path)
    with local_worker(models_dir) as address:
        assigned = assign_remotes(workflow, registry, [f"KSampler={address}"])
        with RemoteRunner(assigned, output_recipe_source(workflow, registry, store)) as runner:
            executor.run(workflow, targets=["6"], node_runner=runner)
            cold = runner.stats["6"]
            benchmark.pedantic(lambda: executor.run(workflow, targets=["6"], node_runner=runner),
                               rounds=3, iterations=1)
            warm = runner.stats["6"]
    benchmark.extra_info.update({"cold_rebuild_s": cold.rebuild_s, "warm_rebuild_s": warm.rebuild_s,
                                 "cold_total_s": cold.total_s, "warm_total_s": warm.total_s,
                                 "cold_misses": cold.cache_misses, "warm_hits": warm.cache_hits})
    print(f"\ncold worker: rebuild {cold.rebuild_s * 1000:.1f} ms ({cold.cache_misses} builds), "
          f"warm: {warm.rebuild_s * 1000:.2f} ms ({warm.cache_hits} cache hits); "
          f"total {cold.total_s * 1000:.1f} -> {warm.total_s * 1000:.1f} ms")
    assert warm.cache_misses == 0
