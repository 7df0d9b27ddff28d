"""Preprocessors that read a network file run on a real worker process: the file goes by sha256
(under the name the node asks for, the pack's default included) and the hint is the local one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.executor import Executor
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RemoteRunner
from diffsplit.engine.remote_assign import assign_remotes
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source

#: each preprocessor as a shared workflow names it: the pack's widgets only, no file
PREPROCESSORS = {
    "OpenposePreprocessor": ("OpenposePreprocessor", {
        "detect_hand": "disable", "detect_body": "enable", "detect_face": "disable", "resolution": 64,
        "scale_stick_for_xinsr_cn": "disable"}),
    # the hand and face files go too, only because they are enabled
    "OpenposePreprocessor-hands-faces": ("OpenposePreprocessor", {
        "detect_hand": "enable", "detect_body": "enable", "detect_face": "enable", "resolution": 64,
        "scale_stick_for_xinsr_cn": "disable"}),
    "LineArtPreprocessor": ("LineArtPreprocessor", {"coarse": "disable", "resolution": 64}),
    "UniFormer-SemSegPreprocessor": ("UniFormer-SemSegPreprocessor", {"resolution": 64}),
}


def workflow(case: str) -> dict[str, Any]:
    class_type, inputs = PREPROCESSORS[case]
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": class_type, "inputs": {"image": ["1", 0], **inputs}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": class_type}},
    }


@pytest.mark.parametrize("case", sorted(PREPROCESSORS))
def test_the_hint_made_on_a_worker_is_the_local_one(
    case: str, registry: NodeRegistry, store: ModelStore, inputs_dir: Path, worker_address: str,
    tmp_path: Path,
) -> None:
    class_type = PREPROCESSORS[case][0]
    document = load_workflow(workflow(case), registry)
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=tmp_path, max_workers=1)
    local = executor.run(document, targets=["2"]).outputs["2"]
    assigned = assign_remotes(document, registry, [f"{class_type}={worker_address}"])
    with RemoteRunner(assigned, output_recipe_source(document, registry, store), local_store=store) as runner:
        remote = executor.run(document, targets=["2"], node_runner=runner)
        assert runner.placement("2") == worker_address
    assert torch.equal(remote.outputs["2"][0], local[0])
    assert remote.outputs["2"][1:] == local[1:]  # the pose keypoints
