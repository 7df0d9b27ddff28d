"""``diffsplit batch``: items per second, all here vs the sampler on a worker with 1 or 2 items in flight.

Eight prompts through the tiny SD 1.5 workflow (8 steps, 64x64), with
:func:`diffsplit.batch_run.run_batch` as the CLI runs it: ``local`` (everything
here, one item at a time: the baseline), ``remote ahead 1`` (KSampler on a
worker process on loopback, items one after another) and ``remote ahead 2``
(the next item's prompts are encoded here while the worker samples). Rows
alternate for ``ROUNDS`` rounds, each keeps its fastest, and ratios are to
``local`` from the same run. On a 2-core machine the worker and this process
share the cores, so the pipeline's gain is bounded by what they do not share;
with the worker on its own GPU the worker's time leaves this machine's budget.
Every figure goes to ``benchmark.extra_info`` and is printed; nothing asserts a time.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_batch_bench.py -s
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor, run_node_locally
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source

from diffsplit.batch_items import BatchItem
from diffsplit.batch_manifest import Manifest, ManifestEntry
from diffsplit.batch_run import BatchPlan, run_batch
from diffsplit.demo import local_worker

ROUNDS = 3
ITEMS = 8
STEPS = 8


class _Quiet:
    def finished(self, entry: ManifestEntry) -> None:
        assert entry.status == "ok", entry.error


def _items() -> list[BatchItem]:
    return [BatchItem(line=n + 1, key=f"{n + 1:02d}", prompt=f"prompt {n}",
                      overrides=(("3.text", f"prompt {n}"),)) for n in range(ITEMS)]


def _run(models_dir: Path, out: Path, remote: str | None, ahead: int) -> float:
    registry = default_registry()
    store = ModelStore(models_dir)
    workflow = load_workflow(sd15_workflow(steps=STEPS, lora=False), registry)
    assigned: Mapping[str, str] = {"6": remote} if remote else {}
    executor = Executor(registry, store, inputs_dir=out, output_dir=out, max_workers=2 if remote else 1)
    runner = (RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store)
              if remote else None)
    plan = BatchPlan(workflow=workflow, registry=registry, executor=executor,
                     node_runner=runner or run_node_locally, manifest=Manifest(out / "manifest.jsonl"),
                     ahead=ahead, remote=runner, assigned=frozenset(assigned))
    started = time.perf_counter()
    try:
        summary = run_batch(plan, _items(), _Quiet())
    finally:
        if runner is not None:
            runner.close()
    assert summary.done == ITEMS
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def fresh_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set written by another process: writing it in this one leaves local runs here 2-3x
    slower afterwards (measured; not the UNet's forward, cause not found), which would flatter the
    worker rows, since the worker is a process of its own."""
    root = tmp_path_factory.mktemp("batch-models")
    subprocess.run([sys.executable, "-m", "diffsplit.cli", "models", "tiny", str(root)], check=True,
                   capture_output=True, timeout=600)
    return root


@pytest.fixture(scope="module")
def fresh_worker(fresh_models: Path) -> Iterator[str]:
    with local_worker(fresh_models) as address:
        yield address


def test_batch_items_per_second(benchmark: Any, fresh_models: Path, fresh_worker: str,
                                tmp_path: Path) -> None:
    models_dir, worker_address = fresh_models, fresh_worker
    rows = {"local": (None, 1), "remote ahead 1": (worker_address, 1), "remote ahead 2": (worker_address, 2)}
    best: dict[str, float] = {}

    def measure() -> None:
        for round_index in range(ROUNDS):
            for name, (remote, ahead) in rows.items():
                folder = tmp_path / f"{name}-{round_index}".replace(" ", "-")
                seconds = _run(models_dir, folder, remote, ahead)
                best[name] = min(best.get(name, seconds), seconds)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    baseline = best["local"]
    print(f"\nbatch of {ITEMS} items, {STEPS} steps, tiny SD 1.5 (fastest of {ROUNDS}):")
    for name, seconds in best.items():
        rate = ITEMS / seconds
        benchmark.extra_info[name] = {"seconds": seconds, "items_per_s": rate, "vs_local": seconds / baseline}
        print(f"  {name:<16} {seconds:6.2f} s  {rate:5.2f} item/s  {seconds / baseline:5.2f}x local time")
    assert set(best) == set(rows)

