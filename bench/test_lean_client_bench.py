"""A lean client at full size: peak memory of a split run's client and worker, against all-local.

A full-size SD 1.5 with seeded random weights (the published configs, 2.13 GB in
fp16: ``gpu_check_models.write_full_checkpoint`` on the CPU) is written to a
temporary models folder, in a child process. The workflow is the GPU check's
text-to-image (``gpu_check_runs.check_workflow``) at 256x256 with one euler step,
so the figures are about loading, not sampling. Each run is ``diffsplit run`` in
a fresh process, cold (no model cache, but the store's sha256 index is warm);
its peak resident memory is ``VmHWM`` of ``/proc/self/status`` read as it exits
(a fresh ``exec`` starts a fresh peak; ``ru_maxrss`` would carry pytest's).

Rows, all in one run:
- all local;
- split, KSampler + VAEDecode on a local worker, lean (the default): the client
  builds only the text encoders;
- the same split with ``--eager-loaders`` (the client loads everything, as before);
- each offloaded node kind alone on a fresh worker: the worker's own peak
  (``VmHWM`` of its process) with it building only the part it needs.

Figures go to ``benchmark.extra_info`` and are printed; the goal (the split
client's peak under 40 % of the all-local one) is reported, not asserted.
Skipped where memory or disk is short.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_lean_client_bench.py -s
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

CHECKPOINT = "sd15-full.safetensors"
NEEDED_MEMORY_BYTES = 16 << 30
NEEDED_DISK_BYTES = 6 << 30
GOAL_RATIO = 0.40
_BENCH = Path(__file__).resolve().parent

#: Runs ``diffsplit.cli.main`` with the given arguments, then prints its peak resident memory.
CLIENT = """
import sys
from diffsplit.cli import main
code = main(sys.argv[1:])
peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print('PEAK_KB', int(peak.split()[1]), flush=True)
sys.exit(code)
"""

#: Builds the full-size model, then writes it; prints the file's size, the resident memory before
#: writing (VmRSS) and the peak while writing (VmHWM restarted after the build): the writer's cost is
#: their difference.
WRITER = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from gpu_check_models import full_checkpoint_parts
from diffsplit.engine.models.checkpoint import save_checkpoint

def status(field):
    line = next(line for line in open('/proc/self/status') if line.startswith(field + ':'))
    return int(line.split()[1]) * 1024

parts = full_checkpoint_parts("sd15", torch.device("cpu"), torch.float16)
built = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # the peak restarts here: building's own peak is not counted
path = Path(sys.argv[1])
path.parent.mkdir(parents=True, exist_ok=True)
save_checkpoint(path, parts)
print(path.stat().st_size, built, status('VmHWM'))
"""


@pytest.fixture(scope="module")
def full_models(tmp_path_factory: pytest.TempPathFactory, require_room: Any) -> Path:
    root = tmp_path_factory.mktemp("full-models")
    require_room(root, NEEDED_MEMORY_BYTES, NEEDED_DISK_BYTES)
    path = root / "checkpoints" / CHECKPOINT
    out = subprocess.run([sys.executable, "-c", WRITER, str(path), str(_BENCH)], check=True,
                         capture_output=True, text=True)
    size, built, peak = (int(value) for value in out.stdout.split())
    print(f"\nwrote {CHECKPOINT} ({_gib(size)}): resident after building {_gib(built)}, peak while "
          f"writing {_gib(peak)} (the writer's own: {_gib(peak - built)})")
    return root


@pytest.fixture(scope="module")
def workflow_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(_BENCH))
    from gpu_check_runs import check_workflow

    path = tmp_path_factory.mktemp("workflow") / "full.json"
    path.write_text(json.dumps(check_workflow(CHECKPOINT, width=256, height=256, steps=1, seed=3)))
    return path


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@contextlib.contextmanager
def worker(models: Path, log: Path) -> Iterator[tuple[str, int]]:
    """A fresh worker process: its address and pid."""
    from diffsplit.demo import READY_PREFIX, stop_process

    command = [sys.executable, "-m", "diffsplit.cli", "worker", "--models", str(models), "--listen",
               "tcp://127.0.0.1:*", "--cache-gb", "16", "--grace", "5"]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(READY_PREFIX):
                    yield line[len(READY_PREFIX):].split()[0], process.pid
                    break
            else:
                raise RuntimeError(f"the worker did not start: {log.read_text()[-2000:]}")
        finally:
            stop_process(process)


def client_run(models: Path, workflow: Path, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One ``diffsplit run`` in a fresh process: its peak memory, wall time and per-node stats."""
    stats = out / "stats.json"
    command = [sys.executable, "-c", CLIENT, "run", str(workflow), "--models", str(models), "--out", str(out),
               "--stats", str(stats), "-q", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"diffsplit run failed ({done.returncode}): {done.stderr[-3000:]}")
    peak_kb = int(next(line for line in done.stdout.splitlines() if line.startswith("PEAK_KB")).split()[1])
    nodes = json.loads(stats.read_text())["nodes"]
    return {"peak_bytes": peak_kb * 1024, "wall_s": wall,
            "sampler_s": nodes["6"]["wall_s"], "decode_s": nodes["7"]["wall_s"]}


def _gib(value: int) -> str:
    return f"{value / (1 << 30):.2f} GiB"


@pytest.mark.timeout(3600)
def test_lean_client_peak_memory_at_full_size(
    benchmark: Any, full_models: Path, workflow_file: Path, tmp_path: Path
) -> None:
    # The store's index is warmed first, so no row pays for the first sha256 of the file.
    from diffsplit.engine.store import ModelStore

    ModelStore(full_models).index_all()
    rows: dict[str, dict[str, Any]] = {}
    rows["local"] = client_run(full_models, workflow_file, tmp_path / "local")
    print(f"\nlocal: {rows['local']}", flush=True)
    remote = ["--remote", "KSampler=ADDR", "--remote", "VAEDecode=ADDR"]
    for name, extra in (("split lean", []), ("split eager", ["--eager-loaders"])):
        with worker(full_models, tmp_path / f"{name}.log") as (address, pid):
            flags = [flag.replace("ADDR", address) for flag in remote]
            rows[name] = client_run(full_models, workflow_file, tmp_path / name.replace(" ", "-"),
                                    [*flags, *extra])
            rows[name]["worker_peak_bytes"] = _vm_hwm(pid)
        print(f"{name}: {rows[name]}", flush=True)
    for kind in ("KSampler", "VAEDecode"):
        with worker(full_models, tmp_path / f"{kind}.log") as (address, pid):
            run = client_run(full_models, workflow_file, tmp_path / kind, ["--remote", f"{kind}={address}"])
            rows[f"worker {kind} only"] = {"worker_peak_bytes": _vm_hwm(pid), "client_peak_bytes":
                                           run["peak_bytes"], "wall_s": run["wall_s"]}

    def again() -> None:  # the timed figure: one more lean split run, cold client, warm worker
        with worker(full_models, tmp_path / "timed.log") as (address, _pid):
            flags = [flag.replace("ADDR", address) for flag in remote]
            client_run(full_models, workflow_file, tmp_path / "timed", flags)

    benchmark.pedantic(again, rounds=1, iterations=1)
    ratio = rows["split lean"]["peak_bytes"] / rows["local"]["peak_bytes"]
    eager_ratio = rows["split eager"]["peak_bytes"] / rows["local"]["peak_bytes"]
    benchmark.extra_info.update({"rows": rows, "lean_over_local": ratio, "eager_over_local": eager_ratio,
                                 "goal": GOAL_RATIO})
    print()
    for name, row in rows.items():
        shown = ", ".join(f"{key} {_gib(value) if key.endswith('bytes') else f'{value:.2f} s'}"
                          for key, value in row.items())
        print(f"{name:>22}: {shown}")
    print(f"split client peak / local peak: lean {ratio:.2f}, eager {eager_ratio:.2f} (goal < {GOAL_RATIO})")
