"""Dtypes on the CPU: what fp16 and bf16 cost and change against fp32, and what a tight budget's moves cost.

The tiny SD 1.5 + LoRA workflow (8 steps, up to the decoded image) runs through a
:class:`~diffsplit.engine.device_runner.DeviceNodeRunner` over a fresh
``DeviceMemory(torch.device("cpu"), policy)`` per run: fp32 (the baseline: the
masters are used, nothing is copied), fp16, bf16, and fp16 under the least budget
the largest node fits in (its models and activation estimate), so a node drops
copies placed before it where the sizes force it (``evicted`` counts them). A row
"plain" runs without the wrapper (what ``diffsplit run`` does on the CPU in fp32)
to show the wrapper's own cost.

Rows alternate for ``ROUNDS`` rounds and keep their fastest run, so load on a
shared machine hits all of them alike; times are ratios to fp32 from the same
run. ``compute`` is the sum of the compute nodes' times (text encoders, sampler,
decoder: where the placing and the dtype act); ``end to end`` adds the loaders.
Image error is against the fp32 image: PSNR (images in 0..1) and the largest
absolute difference. With random tiny weights this measures numeric drift, not
image quality. Every figure goes to ``benchmark.extra_info`` and is printed;
nothing asserts a timing.

    .venv/bin/python -m pytest -q -p no:cacheprovider bench/test_dtype_bench.py -s
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.device_memory import DeviceMemory, target_bytes
from diffsplit.engine.device_runner import DeviceNodeRunner, activation_estimate, computes_on_device
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.example_workflows import sd15_workflow, write_example_inputs
from diffsplit.engine.executor import Executor, NodeCall, NodeRunner, run_node_locally
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.placement import device_modules
from diffsplit.engine.store import ModelStore

ROUNDS = 5
STEPS = 8
DECODE = "7"
COMPUTE_NODES = ("3", "4", "6", "7")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Row:
    name: str
    policy: DtypePolicy | None  # None: no wrapper (plain run_node_locally)
    budget_bytes: int | None = None


@dataclass(frozen=True)
class _Run:
    total_s: float
    compute_s: float
    image: torch.Tensor
    placed: int
    reused: int
    evicted: int
    peak_bytes: int


class _Needs:
    """A node runner that notes, per compute node, its models' bytes and its activation estimate."""

    def __init__(self, memory: DeviceMemory) -> None:
        self.memory = memory
        self.per_node: dict[str, int] = {}
        self.largest_model = 0
        self.largest_activation = 0

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        if computes_on_device(call.node_class):
            modules = device_modules(call.inputs, self.memory)
            sizes = {id(module): target_bytes(module, dtype) for module, dtype in modules}
            activation = activation_estimate(call.node_class, call.inputs, self.memory)
            self.per_node[call.node.id] = sum(sizes.values()) + activation
            self.largest_model = max(self.largest_model, *sizes.values(), 0)
            self.largest_activation = max(self.largest_activation, activation)
        return run_node_locally(call)


@pytest.fixture(scope="module")
def setup(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Executor, Any]:
    registry = default_registry()
    inputs = write_example_inputs(tmp_path_factory.mktemp("input"))
    executor = Executor(registry, ModelStore(models_dir), inputs_dir=inputs,
                        output_dir=tmp_path_factory.mktemp("out"), max_workers=1)
    workflow = load_workflow(sd15_workflow(steps=STEPS), registry)
    return executor, workflow


def _run(executor: Executor, workflow: Any, row: _Row) -> _Run:
    memory = DeviceMemory(CPU, row.policy or DtypePolicy(), row.budget_bytes)
    runner: NodeRunner = run_node_locally
    if row.policy is not None:
        runner = DeviceNodeRunner(run_node_locally, memory)
    started = time.perf_counter()
    result = executor.run(workflow, targets=[DECODE], node_runner=runner)
    total_s = time.perf_counter() - started
    compute_s = sum(result.timings[node_id].wall_s for node_id in COMPUTE_NODES)
    stats = memory.stats()
    image = result.outputs[DECODE][0].detach().to(torch.float32)
    return _Run(total_s, compute_s, image, stats.placed, stats.reused, stats.evicted, stats.peak_bytes)


def _psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((image - reference) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def test_dtypes_and_evictions_on_the_cpu(setup: tuple[Executor, Any], benchmark: Any) -> None:
    executor, workflow = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp16 = DtypePolicy.choose(CPU, dtype="fp16")
        needs = _Needs(DeviceMemory(CPU, fp16))
        executor.run(workflow, targets=[DECODE], node_runner=needs)  # also warms the file reads
        # the least budget every node fits in (its models + its activation estimate); the brief's rule of
        # thumb, largest model + largest activation, is at least this and printed beside it
        budget = max(needs.per_node.values())
        rows = [
            _Row("fp32", DtypePolicy()),
            _Row("plain", None),
            _Row("fp16", fp16),
            _Row("bf16", DtypePolicy.choose(CPU, dtype="bf16")),
            _Row("fp16+evict", fp16, budget),
        ]
        runs: dict[str, list[_Run]] = {row.name: [] for row in rows}
        for _ in range(ROUNDS):
            for row in rows:
                runs[row.name].append(_run(executor, workflow, row))
        benchmark.pedantic(lambda: _run(executor, workflow, rows[2]), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)

    # times: the fastest of the rounds; the image and the counters are the same in every round
    best = {name: replace(done[-1], total_s=min(r.total_s for r in done),
                          compute_s=min(r.compute_s for r in done)) for name, done in runs.items()}
    base = best["fp32"]
    print(f"\ntiny SD 1.5 + LoRA, {STEPS} steps, 64x64, CPU, 1 torch thread, best of {ROUNDS} interleaved; "
          f"budget of fp16+evict: {budget / 2**20:.1f} MiB, the largest node's needs (largest model "
          f"{needs.largest_model / 2**20:.1f} MiB + largest activation estimate "
          f"{needs.largest_activation / 2**20:.1f} MiB = "
          f"{(needs.largest_model + needs.largest_activation) / 2**20:.1f} MiB)")
    print("needs per compute node (MiB): "
          + ", ".join(f"{node_id} {n / 2**20:.1f}" for node_id, n in sorted(needs.per_node.items())))
    print(f"{'row':>11} {'end to end':>10} {'x fp32':>7} {'compute':>9} {'x fp32':>7} {'PSNR dB':>8} "
          f"{'max |d|':>9} {'placed':>6} {'reused':>6} {'evicted':>7} {'peak MiB':>8}")
    info: dict[str, Any] = {"steps": STEPS, "rounds": ROUNDS, "evict_budget_bytes": budget,
                            "node_needs_bytes": needs.per_node}
    for row in rows:
        run = best[row.name]
        psnr = _psnr(run.image, base.image)
        max_abs = float((run.image - base.image).abs().max())
        figures = {
            "total_s": run.total_s, "total_over_fp32": run.total_s / base.total_s,
            "compute_s": run.compute_s, "compute_over_fp32": run.compute_s / base.compute_s,
            "psnr_db": psnr if math.isfinite(psnr) else "inf", "max_abs_diff": max_abs,
            "placed": run.placed, "reused": run.reused, "evicted": run.evicted, "peak_bytes": run.peak_bytes,
        }
        info[row.name] = figures
        print(f"{row.name:>11} {run.total_s * 1000:8.1f}ms {run.total_s / base.total_s:7.2f} "
              f"{run.compute_s * 1000:7.1f}ms {run.compute_s / base.compute_s:7.2f} {psnr:8.1f} "
              f"{max_abs:9.2e} {run.placed:6d} {run.reused:6d} {run.evicted:7d} "
              f"{run.peak_bytes / 2**20:8.1f}")
    benchmark.extra_info.update(info)
