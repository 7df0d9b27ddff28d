"""A night's batch on the tiny set: 1,000 prompts, interrupted once, resumed, every item accounted for.

``diffsplit batch`` runs as its own process (JSONL items, a seed and a prompt each)
with the sampler on a real worker process on loopback. Once ``INTERRUPT_AT`` items
are in the manifest it gets a real SIGINT (exit 130); the same command is run again
and must finish the rest without redoing a finished item. Afterwards the manifest
holds each item exactly once, all ``ok``, each with its image on disk. Printed: the
items each run did, their rates and the total. ``DIFFSPLIT_BENCH_ITEMS`` changes the
count (default 1000). The assertions are about accounting, never about time.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_batch_thousand_bench.py -s
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diffsplit.engine.example_workflows import sd15_workflow

ITEMS = int(os.environ.get("DIFFSPLIT_BENCH_ITEMS", "1000"))
INTERRUPT_AT = max(1, ITEMS * 2 // 5)
STEPS = 4
WAIT_S = 3600.0


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def batch_command(items: Path, workflow: Path, models: Path, out: Path, worker: str) -> list[str]:
    return [sys.executable, "-m", "diffsplit.cli", "batch", str(items), "--workflow", str(workflow),
            "--models", str(models), "--out", str(out), "-q", "--remote", f"KSampler={worker}"]


def test_a_thousand_items_interrupted_once_and_resumed(
    benchmark: Any, capsys: Any, models_dir: Path, worker_address: str, tmp_path: Path,
) -> None:
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(sd15_workflow(steps=STEPS)))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"p{n:04d}", "prompt": f"a fox, take {n}", "seed": n}) + "\n"
                             for n in range(ITEMS)))
    out = tmp_path / "images"
    command = batch_command(items, workflow, models_dir, out, worker_address)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    previous = signal.getsignal(signal.SIGINT)  # a suite started with `cmd &` ignores SIGINT: not the run
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + WAIT_S
    while len(manifest_lines(out)) < INTERRUPT_AT and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, first_err = process.communicate(timeout=120)
    first_s = time.perf_counter() - started
    assert process.returncode == 130, first_err
    first = manifest_lines(out)
    assert INTERRUPT_AT <= len(first) < ITEMS

    started = time.perf_counter()
    second = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            timeout=WAIT_S, check=False)
    second_s = time.perf_counter() - started
    assert second.returncode == 0, second.stderr
    assert f"{ITEMS - len(first)} done, {len(first)} already done, 0 failed" in second.stderr

    lines = manifest_lines(out)
    names = [line["item"] for line in lines]
    assert sorted(names) == sorted(f"p{n:04d}" for n in range(ITEMS)), "an item is missing or repeated"
    assert all(line["status"] == "ok" for line in lines)
    assert all(line["outputs"] and all((out / path).is_file() for path in line["outputs"]) for line in lines)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    figures = {"items": ITEMS, "first_run_items": len(first), "first_run_s": first_s,
               "second_run_items": ITEMS - len(first), "second_run_s": second_s,
               "first_rate": len(first) / first_s, "second_rate": (ITEMS - len(first)) / second_s}
    benchmark.extra_info.update(figures)
    with capsys.disabled():
        print(f"\n[batch of {ITEMS}] interrupted after {len(first)} items in {first_s:.1f} s "
              f"({figures['first_rate']:.2f} item/s), resumed: {ITEMS - len(first)} more in {second_s:.1f} s "
              f"({figures['second_rate']:.2f} item/s); every item once, all ok")
