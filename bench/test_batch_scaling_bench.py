"""``diffsplit batch`` of many prompts: one worker against two, and the plain workers against Ray.

``ITEMS`` prompts (``DIFFSPLIT_BENCH_ITEMS``, default 120; the issue's figure is
1,000) through the tiny SD 1.5 workflow (``STEPS`` steps, 64x64), run by the
real CLI in this process, four ways:

- ``workers 1``: KSampler on one worker process (``--threads 1``), 4 items in flight;
- ``workers 2``: the same with two worker processes listed for the node;
- ``ray 1`` / ``ray 2``: ``--ray auto`` on a local Ray instance started here
  (``num_cpus=4`` logical), one or two sampling actors, ``--ray-threads 1``.

Each row reports its whole time and its *steady* rate: items per second from the
10th finished item to the last, so a Ray pipeline's actor start (each actor
imports torch) and a worker's first model build are left out of the rate and
shown apart. Ratios are to ``workers 1`` from the same run. On a 2-core machine
the client's own work (prompt encoding, decoding, saving) shares the cores with
the workers, so two workers cannot reach 2x here; the row shows what they reach.
Nothing asserts a time.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_batch_scaling_bench.py -s
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.example_workflows import sd15_workflow

from diffsplit import batch_command
from diffsplit.cli import main
from diffsplit.demo import local_worker

ITEMS = int(os.environ.get("DIFFSPLIT_BENCH_ITEMS", "120"))
STEPS = 4
#: Items finished before the steady rate is measured (start-up left out).
WARM_ITEMS = 10


@pytest.fixture(scope="module")
def two_workers(models_dir: Path) -> Iterator[list[str]]:
    with ExitStack() as stack:
        yield [stack.enter_context(local_worker(models_dir, extra_args=["--threads", "1"])) for _ in range(2)]


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _run(monkeypatch: pytest.MonkeyPatch, folder: Path, models_dir: Path, *extra: str) -> dict[str, float]:
    folder.mkdir(parents=True)
    workflow = folder / "wf.json"
    workflow.write_text(json.dumps(sd15_workflow(steps=STEPS, lora=False)), encoding="utf-8")
    items = folder / "prompts.txt"
    items.write_text("".join(f"prompt number {n}\n" for n in range(ITEMS)), encoding="utf-8")
    finished: list[float] = []
    original = batch_command._Bar.finished

    def timed(bar: Any, entry: Any) -> None:
        assert entry.status == "ok", entry.error
        finished.append(time.perf_counter())
        original(bar, entry)

    monkeypatch.setattr(batch_command._Bar, "finished", timed)
    started = time.perf_counter()
    code = main(["batch", str(items), "--workflow", str(workflow), "--models", str(models_dir), "--out",
                 str(folder / "out"), "-q", *extra])
    total = time.perf_counter() - started
    assert code == 0 and len(finished) == ITEMS
    steady = (ITEMS - WARM_ITEMS) / (finished[-1] - finished[WARM_ITEMS - 1])
    return {"total_s": total, "steady_items_per_s": steady, "first_item_s": finished[0] - started}


def test_batch_one_worker_two_workers_and_ray(benchmark: Any, monkeypatch: pytest.MonkeyPatch,
                                              models_dir: Path, two_workers: list[str], ray_instance: None,
                                              tmp_path: Path) -> None:
    one, both = two_workers[0], ",".join(two_workers)
    rows = {
        "workers 1": ("--remote", f"6={one}", "--ahead", "4"),
        "workers 2": ("--remote", f"6={both}", "--ahead", "4"),
        "ray 1": ("--ray", "auto", "--ray-actors", "1", "--ray-threads", "1"),
        "ray 2": ("--ray", "auto", "--ray-actors", "2", "--ray-threads", "1"),
    }
    results: dict[str, dict[str, float]] = {}

    def measure() -> None:
        for name, extra in rows.items():
            results[name] = _run(monkeypatch, tmp_path / name.replace(" ", "-"), models_dir, *extra)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    baseline = results["workers 1"]["steady_items_per_s"]
    print(f"\ndiffsplit batch of {ITEMS} items, {STEPS} steps, tiny SD 1.5, 64x64:")
    for name, figures in results.items():
        ratio = figures["steady_items_per_s"] / baseline
        benchmark.extra_info[name] = {**figures, "steady_vs_one_worker": ratio}
        print(f"  {name:<10} total {figures['total_s']:7.1f} s  first item {figures['first_item_s']:5.1f} s  "
              f"steady {figures['steady_items_per_s']:5.2f} item/s  {ratio:4.2f}x one worker")
    assert set(results) == set(rows)
