"""T2I-Adapters steering sampler runs: alone, beside a ControlNet, at strength 0, and on a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffsplit.engine.example_workflows import controlnet_workflow
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.models.tiny import TINY_T2I_ADAPTER_FILE
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source


def adapter_workflow(strength: float = 0.9, with_controlnet: bool = False) -> dict[str, Any]:
    workflow = controlnet_workflow()
    workflow["14"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": TINY_T2I_ADAPTER_FILE}}
    applied_on = ["11", 0] if with_controlnet else ["3", 0]
    workflow["15"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": applied_on, "control_net": ["14", 0], "image": ["10", 0], "strength": strength}}
    workflow["6"]["inputs"]["positive"] = ["15", 0]
    return workflow


def image_of(registry: NodeRegistry, store: ModelStore, inputs_dir: Path, out: Path,
             document: dict[str, Any], remote: str | None = None) -> torch.Tensor:
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=out, max_workers=1)
    workflow = load_workflow(document, registry)
    if remote is None:
        return executor.run(workflow).outputs["7"][0]
    assigned = assign_remotes(workflow, registry, [f"KSampler={remote}"])
    with RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store) as runner:
        return executor.run(workflow, node_runner=runner).outputs["7"][0]


def test_an_adapter_steers_the_run_and_adds_to_a_controlnet(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path,
) -> None:
    plain = controlnet_workflow()
    del plain["11"]
    plain["6"]["inputs"]["positive"] = ["3", 0]
    base = image_of(registry, store, inputs_dir, tmp_path, plain)
    adapted = image_of(registry, store, inputs_dir, tmp_path, adapter_workflow())
    assert not torch.equal(base, adapted)
    # an adapter applied at full strength but outside every step (a window that starts at the end)
    # adds nothing: the sampler honours its window, and the image is the plain one bit for bit
    late = adapter_workflow()
    late["15"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "control_net": ["14", 0], "image": ["10", 0],
        "strength": 0.9, "start_percent": 1.0, "end_percent": 1.0}}
    late["6"]["inputs"].update(positive=["15", 0], negative=["15", 1])
    assert torch.equal(image_of(registry, store, inputs_dir, tmp_path, late), base)
    early = dict(late, **{"15": {**late["15"], "inputs": {**late["15"]["inputs"], "start_percent": 0.0}}})
    assert not torch.equal(image_of(registry, store, inputs_dir, tmp_path, early), base)
    controlnet_only = image_of(registry, store, inputs_dir, tmp_path, controlnet_workflow())
    both = image_of(registry, store, inputs_dir, tmp_path, adapter_workflow(with_controlnet=True))
    assert not torch.equal(both, controlnet_only) and not torch.equal(both, adapted)


def test_an_adapter_run_on_a_worker_equals_the_local_one(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path, worker_address: str,
) -> None:
    document = adapter_workflow(with_controlnet=True)
    here = image_of(registry, store, inputs_dir, tmp_path, document)
    there = image_of(registry, store, inputs_dir, tmp_path, document, remote=worker_address)
    assert torch.equal(here, there)
