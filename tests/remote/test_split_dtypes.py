"""Split == local in every dtype: a worker in fp16 or bf16 gives what the same dtype gives here.

The fidelity contract of the GPU-workers issue, on the CPU: when the client's
local nodes and the worker use the same device kind and dtypes, the split run
equals the local run bit for bit; in another dtype it differs (so the test
would notice a worker that ignored its ``--dtype``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffsplit.engine.device_memory import DeviceMemory
from diffsplit.engine.device_runner import DeviceNodeRunner
from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.executor import Executor, RunResult, run_node_locally
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source

from diffsplit.demo import local_worker

#: The tiny SD 1.5 workflow's sampler and decoder (sd15_workflow's node ids).
SAMPLER, DECODER = "6", "7"


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def dtype_worker(request: pytest.FixtureRequest, models_dir: Path) -> Iterator[tuple[str, str]]:
    """A worker process whose models compute in ``request.param``; yields (dtype, address)."""
    with local_worker(models_dir, extra_args=["--device", "cpu", "--dtype", request.param]) as address:
        yield request.param, address


def _run(models_dir: Path, tmp_path: Path, registry: NodeRegistry, dtype: str,
         remote: list[str]) -> RunResult:
    store = ModelStore(models_dir)
    workflow = load_workflow(sd15_workflow(), registry)
    executor = Executor(registry, store, output_dir=tmp_path / "out", max_workers=1)
    memory = DeviceMemory(torch.device("cpu"), DtypePolicy.choose(torch.device("cpu"), dtype=dtype))
    assigned = assign_remotes(workflow, registry, remote)
    if not assigned:
        return executor.run(workflow, node_runner=DeviceNodeRunner(run_node_locally, memory))
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        local_part = DeviceNodeRunner(runner, memory, elsewhere=lambda node_id: node_id in assigned)
        return executor.run(workflow, node_runner=local_part)


def test_split_equals_local_in_the_same_dtype(
    dtype_worker: tuple[str, str], models_dir: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    dtype, address = dtype_worker
    local = _run(models_dir, tmp_path / "local", registry, dtype, [])
    split = _run(models_dir, tmp_path / "split", registry, dtype,
                 [f"KSampler={address}", f"VAEDecode={address}"])
    for node_id in (SAMPLER, DECODER):
        a, b = local.outputs[node_id][0], split.outputs[node_id][0]
        a = a["samples"] if isinstance(a, dict) else a
        b = b["samples"] if isinstance(b, dict) else b
        assert a.dtype == b.dtype == torch.float32, "outputs are float32 in any model dtype"
        assert torch.equal(a, b), f"node {node_id} differs between the {dtype} worker and {dtype} here"


def test_a_worker_in_another_dtype_gives_another_image(
    dtype_worker: tuple[str, str], models_dir: Path, tmp_path: Path, registry: NodeRegistry
) -> None:
    dtype, address = dtype_worker
    fp32_here = _run(models_dir, tmp_path / "local", registry, "fp32", [])
    split = _run(models_dir, tmp_path / "split", registry, "fp32", [f"KSampler={address}"])
    a, b = fp32_here.outputs[DECODER][0], split.outputs[DECODER][0]
    assert not torch.equal(a, b), f"the {dtype} worker ignored its --dtype"
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.5
