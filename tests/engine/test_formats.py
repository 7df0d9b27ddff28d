"""ComfyUI's API and UI workflow formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.formats import detect_format, load_workflow, save_api_format
from diffsplit.engine.graph import Link, Node, Workflow

API_WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "MakeNumber", "inputs": {"seed": 5, "value": 2.5}, "_meta": {"title": "Start"}},
    "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 3.0}},
    "3": {
        "class_type": "Format",
        "inputs": {"x": [2, 0], "template": "{x}", "style": "plain"},
        "_meta": {"remote": "tcp://gpu:5555"},
    },
    "4": {"class_type": "Show", "inputs": {"text": ["3", 0]}},
}


# -- API format -----------------------------------------------------------------------------------


def test_api_format_is_parsed(toy) -> None:
    workflow = load_workflow(API_WORKFLOW, toy.registry)
    assert workflow.source_format == "api"
    assert workflow.node("2").inputs == {"x": Link("1", 0), "factor": 3.0}
    assert workflow.node("3").inputs["x"] == Link("2", 0)  # numeric source ids become strings
    assert workflow.node("3").remote == "tcp://gpu:5555"
    assert workflow.node("1").title == "Start"
    workflow.validate(toy.registry)


def test_api_format_round_trips(toy, tmp_path: Path) -> None:
    workflow = load_workflow(API_WORKFLOW, toy.registry)
    saved = save_api_format(workflow)
    assert saved["3"]["inputs"]["x"] == ["2", 0]
    assert saved["3"]["_meta"] == {"remote": "tcp://gpu:5555"}
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(saved))
    reloaded = load_workflow(path, toy.registry)
    assert reloaded.nodes == workflow.nodes


def test_prompt_wrapper_is_unwrapped_and_keeps_the_ui_form(toy) -> None:
    wrapped = {"prompt": API_WORKFLOW, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}}
    workflow = load_workflow(wrapped, toy.registry)
    assert set(workflow.nodes) == {"1", "2", "3", "4"}
    assert workflow.extra["workflow"] == {"nodes": []}


def test_api_format_errors_name_the_node(toy) -> None:
    with pytest.raises(WorkflowError, match="node 7: API node has no class_type"):
        load_workflow({"7": {"inputs": {}}, "8": {"class_type": "Show", "inputs": {}}}, toy.registry)
    with pytest.raises(WorkflowError, match="node 7 \\(Show\\): 'inputs' must be an object"):
        load_workflow({"prompt": {"7": {"class_type": "Show", "inputs": [1, 2]}}}, toy.registry)


def test_unrecognised_documents_are_rejected(toy, tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"not a ComfyUI workflow.*keys nodes"):
        load_workflow({"nodes": "many"}, toy.registry)
    assert detect_format({"nodes": [], "links": []}) == "ui"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(bad, toy.registry)
    with pytest.raises(WorkflowError, match="cannot read workflow"):
        load_workflow(tmp_path / "missing.json", toy.registry)


# -- UI format ------------------------------------------------------------------------------------


def test_ui_format_resolves_primitives_reroutes_bypass_and_mutes(toy, make_ui) -> None:
    document = make_ui()
    workflow = load_workflow(document, toy.registry)
    assert workflow.source_format == "ui"
    expected = {
        "1": Node("1", "MakeNumber", {"seed": 5, "value": 2.5}),
        "3": Node("3", "Scale", {"x": Link("1", 0), "factor": 3.0}),
        "4": Node("4", "Scale", {"x": Link("1", 0), "factor": 3.0}),
        "5": Node("5", "Add", {"a": Link("3", 0), "b": Link("4", 0)}),
        "7": Node(
            "7",
            "Format",
            {"x": Link("5", 0), "template": "{x}", "style": "plain"},
            {"title": "Pretty", "remote": "tcp://gpu:5555"},
        ),
        "8": Node("8", "Show", {"text": Link("7", 0)}),
    }
    assert dict(workflow.nodes) == expected
    assert workflow.extra["workflow"] is document
    workflow.validate(toy.registry)


def test_ui_widgets_without_control_value_and_as_a_dict(toy, make_ui) -> None:
    document = make_ui()
    document["nodes"][0]["widgets_values"] = [5, 2.5]
    assert load_workflow(document, toy.registry).node("1").inputs == {"seed": 5, "value": 2.5}
    document["nodes"][0]["widgets_values"] = {"value": 7.0, "seed": 1, "unrelated": True}
    assert load_workflow(document, toy.registry).node("1").inputs == {"seed": 1, "value": 7.0}


@pytest.mark.parametrize(
    "values", [["{x} and"], [], None, "absent"], ids=["short", "empty", "null", "absent"]
)
def test_ui_missing_widget_values_take_the_class_defaults(toy, make_ui, values) -> None:
    document = make_ui()
    if values == "absent":
        del document["nodes"][6]["widgets_values"]
    else:
        document["nodes"][6]["widgets_values"] = values
    inputs = load_workflow(document, toy.registry).node("7").inputs
    assert inputs["style"] == "plain"
    assert inputs["template"] == ("{x} and" if values == ["{x} and"] else "{x}")


def test_ui_legacy_control_booleans_and_prefixed_choices(toy, make_ui) -> None:
    document = make_ui()
    for legacy in (True, False):
        document["nodes"][0]["widgets_values"] = [5, legacy, 2.5]
        assert load_workflow(document, toy.registry).node("1").inputs == {"seed": 5, "value": 2.5}
    document["nodes"][6]["widgets_values"] = ["{x}", "sample_fancy"]
    assert load_workflow(document, toy.registry).node("7").inputs["style"] == "fancy"
    document["nodes"][6]["widgets_values"] = ["{x}", "sample_other"]  # not a known choice: left to validation
    assert load_workflow(document, toy.registry).node("7").inputs["style"] == "sample_other"


def test_ui_unknown_node_type_names_the_node(toy, make_ui) -> None:
    document = make_ui()
    document["nodes"][4]["type"] = "Ad"
    with pytest.raises(WorkflowError, match=r"node 5 \(Ad\): unknown node class 'Ad'; did you mean Add"):
        load_workflow(document, toy.registry)


def test_ui_dangling_link_id_is_reported(toy, make_ui) -> None:
    document = make_ui()
    document["links"] = [row for row in document["links"] if row[0] != 7]
    with pytest.raises(WorkflowError, match=r"node 5 \(Add\) input 'a': refers to link 7"):
        load_workflow(document, toy.registry)


def test_ui_input_fed_by_a_muted_node_is_missing(toy, make_ui) -> None:
    document = make_ui()
    document["nodes"][2]["mode"] = 2  # mute node 3: Add loses input a
    workflow = load_workflow(document, toy.registry)
    assert "3" not in workflow.nodes and "a" not in workflow.node("5").inputs
    with pytest.raises(
        WorkflowError, match=r"node 5 \(Add\) input 'a': required input \(NUMBER\) is missing"
    ):
        workflow.validate(toy.registry)


def test_ui_bypass_uses_matching_input_slot_then_first_of_type(toy, make_ui) -> None:
    document = make_ui()
    add = document["nodes"][4]
    add["mode"] = 4  # bypass Add: Scale 6 (bypassed too) then Format 7 get Add's input of type NUMBER
    workflow = load_workflow(document, toy.registry)
    assert workflow.node("7").inputs["x"] == Link("3", 0)  # slot 0 of Add, via the bypassed Scale
    add["inputs"][0]["type"] = "OTHER"
    assert load_workflow(document, toy.registry).node("7").inputs["x"] == Link("4", 0)  # first NUMBER
    add["inputs"][1]["type"] = "OTHER"
    assert "x" not in load_workflow(document, toy.registry).node("7").inputs


def test_ui_converted_widget_without_link_keeps_its_value(toy, make_ui) -> None:
    document = make_ui()
    document["nodes"][2]["inputs"][1]["link"] = None
    document["nodes"][2]["widgets_values"] = [0.5]
    assert load_workflow(document, toy.registry).node("3").inputs["factor"] == 0.5


def test_ui_links_as_objects_are_accepted(toy, make_ui) -> None:
    document = make_ui()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    document["links"] = [dict(zip(keys, row, strict=True)) for row in document["links"]]
    assert load_workflow(document, toy.registry).nodes == load_workflow(make_ui(), toy.registry).nodes


def test_ui_and_api_forms_describe_the_same_graph(toy, make_ui) -> None:
    workflow = load_workflow(make_ui(), toy.registry)
    from_api = load_workflow(save_api_format(workflow), toy.registry)
    assert from_api.nodes == workflow.nodes
    assert isinstance(from_api, Workflow) and from_api.source_format == "api"
