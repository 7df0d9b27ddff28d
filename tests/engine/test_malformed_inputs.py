"""Malformed documents and values give errors that name the node, never raw Python exceptions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore

UI_BASE = {
    "nodes": [
        {"id": 7, "type": "EmptyLatentImage", "inputs": [], "outputs": [], "widgets_values": [64, 64, 1]}
    ],
    "links": [],
}


@pytest.mark.parametrize("field, value", [
    ("inputs", 5),
    ("properties", [1]),
    ("inputs", [{"name": "x", "link": [1]}]),
    ("widgets_values", 3),
])
def test_malformed_ui_nodes_name_the_node(field: str, value: object) -> None:
    document = copy.deepcopy(UI_BASE)
    document["nodes"][0][field] = value
    with pytest.raises(WorkflowError) as caught:
        load_workflow(document, default_registry())
    assert caught.value.node_id == "7" and caught.value.class_type == "EmptyLatentImage"


def test_malformed_ui_top_level_fields_are_ignored_or_refused_cleanly() -> None:
    with_definitions = {**copy.deepcopy(UI_BASE), "definitions": [1]}
    assert set(load_workflow(with_definitions, default_registry()).nodes) == {"7"}
    with pytest.raises(WorkflowError, match="links"):
        load_workflow({**copy.deepcopy(UI_BASE), "links": {"a": 1}}, default_registry())


def test_api_extra_data_of_the_wrong_type_is_ignored() -> None:
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    workflow = load_workflow({"prompt": prompt, "extra_data": [1]}, default_registry())
    assert set(workflow.nodes) == {"1"}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    document = {"1": {"class_type": "EmptyLatentImage",
                      "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "2": {"class_type": "LatentUpscaleBy",
                      "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact", "scale_by": value}}}
    workflow = load_workflow(document, default_registry())
    with pytest.raises(WorkflowError, match="finite") as caught:
        workflow.validate(default_registry())
    assert caught.value.input_name == "scale_by"


def test_a_corrupt_index_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    model = tmp_path / "checkpoints" / "m.safetensors"
    model.write_bytes(b"weights")
    (tmp_path / ".diffsplit-index.json").write_text(json.dumps({"version": 1, "entries": [1, 2]}))
    store = ModelStore(tmp_path)
    import hashlib

    assert store.sha256(model) == hashlib.sha256(b"weights").hexdigest()
