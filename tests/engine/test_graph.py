"""The workflow graph: order, ancestors, cycles, overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Link, Node, Workflow, node_sort_key
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.overrides import parse_set_option, parse_set_options
from diffsplit.engine.store import ModelStore


def number_chain() -> Workflow:
    """1 MakeNumber → 2 Scale → 10 Format → 11 Show, plus 3 MakeNumber feeding nothing."""
    return Workflow.of(
        Node("11", "Show", {"text": Link("10", 0)}),
        Node("10", "Format", {"x": Link("2", 0), "template": "{x}", "style": "plain"}),
        Node("2", "Scale", {"x": Link("1", 0), "factor": 2.0}),
        Node("1", "MakeNumber", {"seed": 1, "value": 3.0}),
        Node("3", "MakeNumber", {"seed": 2, "value": 4.0}),
    )


def test_node_sort_key_is_natural() -> None:
    assert sorted(["10", "2", "1", "10:2", "10:10", "a"], key=node_sort_key) == [
        "1",
        "2",
        "10",
        "10:2",
        "10:10",
        "a",
    ]


def test_nodes_and_workflow_are_immutable() -> None:
    inputs = {"seed": 1, "value": 2.0}
    node = Node("1", "MakeNumber", inputs)
    inputs["seed"] = 99
    assert node.inputs["seed"] == 1
    with pytest.raises(TypeError):
        node.inputs["seed"] = 5  # type: ignore[index]
    workflow = Workflow.of(node)
    with pytest.raises(TypeError):
        workflow.nodes["2"] = node  # type: ignore[index]
    assert node.with_inputs(seed=7).inputs["seed"] == 7 and node.inputs["seed"] == 1


def test_links_and_literals_are_separated() -> None:
    node = number_chain().node("10")
    assert node.links == {"x": Link("2", 0)}
    assert node.literals == {"template": "{x}", "style": "plain"}
    assert node.title == "Format"
    assert node.with_meta(title="Pretty", remote="tcp://gpu:5555").remote == "tcp://gpu:5555"


def test_topological_order_is_deterministic_with_numeric_ties() -> None:
    workflow = Workflow.of(
        Node("10", "MakeNumber", {}),
        Node("9", "MakeNumber", {}),
        Node("100", "Add", {"a": Link("10", 0), "b": Link("9", 0)}),
        Node("2", "Scale", {"x": Link("100", 0)}),
    )
    assert workflow.topological_order() == ("9", "10", "100", "2")
    assert list(workflow.nodes) == ["2", "9", "10", "100"]


def test_ancestors_dependents_and_needed_nodes() -> None:
    workflow = number_chain()
    assert workflow.ancestors("11") == {"10", "2", "1"}
    assert workflow.ancestors("1") == frozenset()
    assert workflow.dependents()["1"] == {"2"}
    assert workflow.needed_for(["10"]) == {"10", "2", "1"}


def test_output_nodes_come_from_the_registry(toy) -> None:
    assert number_chain().output_node_ids(toy.registry) == ("11",)


def test_cycle_is_named() -> None:
    workflow = Workflow.of(
        Node("1", "MakeNumber", {}),
        Node("2", "Add", {"a": Link("1", 0), "b": Link("4", 0)}),
        Node("3", "Scale", {"x": Link("2", 0)}),
        Node("4", "Scale", {"x": Link("3", 0)}),
        Node("5", "Show", {"text": Link("4", 0)}),
    )
    with pytest.raises(WorkflowError, match="cycle") as caught:
        workflow.topological_order()
    message = str(caught.value)
    assert "2 (Add) -> 3 (Scale) -> 4 (Scale) -> 2 (Add)" in message
    assert "1 (MakeNumber)" not in message and "5 (Show)" not in message


def test_self_loop_is_a_cycle(toy) -> None:
    workflow = Workflow.of(Node("7", "Scale", {"x": Link("7", 0)}))
    with pytest.raises(WorkflowError, match=r"cycle: 7 \(Scale\) -> 7 \(Scale\)"):
        workflow.validate(toy.registry)


def test_duplicate_ids_and_mismatched_keys_are_rejected() -> None:
    with pytest.raises(WorkflowError, match="duplicate node id"):
        Workflow.of(Node("1", "Show", {}), Node("1", "Show", {}))
    with pytest.raises(WorkflowError, match="has id"):
        Workflow({"1": Node("2", "Show", {})})


# -- overrides ----------------------------------------------------------------------------------


def test_parse_set_option_parses_json_and_falls_back_to_text() -> None:
    assert parse_set_option("12.steps=4") == ("12.steps", 4)
    assert parse_set_option("12.cfg=6.5") == ("12.cfg", 6.5)
    assert parse_set_option("3.enabled=false") == ("3.enabled", False)
    assert parse_set_option("3.name=euler") == ("3.name", "euler")
    assert parse_set_option('3.name="42"') == ("3.name", "42")
    assert parse_set_option("3.text=a=b") == ("3.text", "a=b")
    assert parse_set_options(["1.a=1", "1.a=2"]) == {"1.a": 2}
    for bad in ("12steps=4", "12.steps", ".steps=1", "12.=1"):
        with pytest.raises(WorkflowError, match=r"NODE\.INPUT=VALUE"):
            parse_set_option(bad)


def test_with_overrides_sets_inputs_by_id_title_or_class(toy) -> None:
    workflow = number_chain()
    changed = workflow.with_overrides({"2.factor": 5.0, "Format.style": "fancy"})
    assert changed.node("2").inputs["factor"] == 5.0
    assert changed.node("10").inputs["style"] == "fancy"
    assert workflow.node("2").inputs["factor"] == 2.0
    titled = workflow.with_node(workflow.node("2").with_meta(title="Doubler"))
    assert titled.with_overrides({"Doubler.factor": 1.5}).node("2").inputs["factor"] == 1.5


def test_with_overrides_rejects_bad_node_or_input(toy) -> None:
    workflow = number_chain()
    with pytest.raises(WorkflowError, match="no node '99'"):
        workflow.with_overrides({"99.steps": 4})
    with pytest.raises(WorkflowError, match="several nodes") as caught:
        workflow.with_overrides({"MakeNumber.value": 1.0})
    assert "1, 3" in str(caught.value)
    with pytest.raises(WorkflowError) as caught:
        workflow.with_overrides({"2.steps": 4})
    assert caught.value.node_id == "2" and caught.value.input_name == "steps"
    assert "factor" in str(caught.value)
    # an input the class declares but the node does not set yet, with the registry's help:
    bare = Workflow.of(Node("1", "Scale", {"x": Link("5", 0)}))
    with pytest.raises(WorkflowError):
        bare.with_overrides({"1.factor": 2.0})
    assert bare.with_overrides({"1.factor": 2.0}, toy.registry).node("1").inputs["factor"] == 2.0


# -- validation -----------------------------------------------------------------------------------


def test_valid_workflow_passes(toy) -> None:
    number_chain().validate(toy.registry)


def assert_invalid(
    workflow: Workflow,
    registry: NodeRegistry,
    node_id: str,
    class_type: str,
    input_name: str | None,
    *fragments: str,
    store: ModelStore | None = None,
) -> None:
    with pytest.raises(WorkflowError) as caught:
        workflow.validate(registry, store)
    error = caught.value
    message = str(error)
    assert (error.node_id, error.class_type, error.input_name) == (node_id, class_type, input_name), message
    assert f"node {node_id} ({class_type})" in message
    if input_name is not None:
        assert f"input '{input_name}'" in message
    for fragment in fragments:
        assert fragment in message


def replaced(node: Node) -> Workflow:
    return number_chain().with_node(node)


def test_unknown_class_suggests_close_matches(toy) -> None:
    workflow = replaced(Node("2", "Scal", {"x": Link("1", 0)}))
    assert_invalid(
        workflow, toy.registry, "2", "Scal", None, "unknown node class 'Scal'", "did you mean Scale"
    )


def test_missing_required_input(toy) -> None:
    assert_invalid(replaced(Node("2", "Scale", {"factor": 2.0})), toy.registry, "2", "Scale", "x", "missing")


def test_missing_optional_input_is_fine(toy) -> None:
    replaced(Node("2", "Scale", {"x": Link("1", 0)})).validate(toy.registry)


def test_unknown_input_name(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": Link("1", 0), "factr": 2.0}))
    assert_invalid(workflow, toy.registry, "2", "Scale", "factr", "unknown input", "x, factor")


def test_link_to_missing_node(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": Link("42", 0)}))
    assert_invalid(workflow, toy.registry, "2", "Scale", "x", "node 42", "not in the workflow")


def test_link_to_missing_output_index(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": Link("1", 3)}))
    assert_invalid(
        workflow, toy.registry, "2", "Scale", "x", "output 3 of node 1 (MakeNumber)", "1 output(s)"
    )


def test_link_of_wrong_type(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": Link("10", 0)}))
    assert_invalid(workflow, toy.registry, "2", "Scale", "x", "expects NUMBER", "node 10 (Format) is STRING")


def test_combo_input_accepts_a_string_link_but_not_a_number(toy) -> None:
    format_node = number_chain().node("10")
    style_source = Node("20", "Format", {"x": Link("2", 0), "template": "plain", "style": "plain"})
    replaced(format_node.with_inputs(style=Link("20", 0))).with_node(style_source).validate(toy.registry)
    bad = replaced(format_node.with_inputs(style=Link("1", 0)))
    assert_invalid(bad, toy.registry, "10", "Format", "style", "expects COMBO", "NUMBER")


def test_value_out_of_range(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": Link("1", 0), "factor": 11.0}))
    assert_invalid(workflow, toy.registry, "2", "Scale", "factor", "above the maximum 10")
    workflow = replaced(Node("1", "MakeNumber", {"seed": -1, "value": 3.0}))
    assert_invalid(workflow, toy.registry, "1", "MakeNumber", "seed", "below the minimum 0")


@pytest.mark.parametrize(
    ("node", "input_name", "fragment"),
    [
        (Node("1", "MakeNumber", {"seed": 1.5, "value": 3.0}), "seed", "expects INT"),
        (Node("1", "MakeNumber", {"seed": True, "value": 3.0}), "seed", "expects INT"),
        (Node("1", "MakeNumber", {"seed": 1, "value": "3"}), "value", "expects FLOAT"),
        (
            Node("10", "Format", {"x": Link("2", 0), "template": 5, "style": "plain"}),
            "template",
            "expects STRING",
        ),
        (Node("3", "Toggle", {"enabled": 1}), "enabled", "expects BOOLEAN"),
    ],
)
def test_wrong_python_type(toy, node: Node, input_name: str, fragment: str) -> None:
    assert_invalid(replaced(node), toy.registry, node.id, node.class_type, input_name, fragment)


def test_int_accepted_for_float(toy) -> None:
    replaced(Node("1", "MakeNumber", {"seed": 1, "value": 3})).validate(toy.registry)


def test_value_not_among_combo_choices(toy) -> None:
    workflow = replaced(Node("10", "Format", {"x": Link("2", 0), "template": "{x}", "style": "bold"}))
    assert_invalid(workflow, toy.registry, "10", "Format", "style", "'bold' is not one of", "plain, fancy")


def test_literal_for_a_link_only_input(toy) -> None:
    workflow = replaced(Node("2", "Scale", {"x": 3.0}))
    assert_invalid(workflow, toy.registry, "2", "Scale", "x", "expects a link from a NUMBER output")


def test_model_file_missing_from_the_store(toy, tiny_store_root: Path) -> None:
    store = ModelStore(tiny_store_root)
    workflow = Workflow.of(Node("4", "LoadModel", {"ckpt_name": "x.safetensors"}))
    workflow.validate(toy.registry)  # without a store, model names are not checked
    assert_invalid(
        workflow,
        toy.registry,
        "4",
        "LoadModel",
        "ckpt_name",
        'ckpt_name "x.safetensors" not found in checkpoints/; available: base.safetensors, sd/v15.ckpt',
        store=store,
    )
    Workflow.of(Node("4", "LoadModel", {"ckpt_name": "sd/v15.ckpt"})).validate(toy.registry, store)


def test_registry_get_names_close_matches(toy) -> None:
    with pytest.raises(
        WorkflowError, match=r"unknown node class 'Ad'; did you mean Add.*; known: Add, Format"
    ):
        toy.registry.get("Ad")
    assert toy.registry.get("Add").name == "Add"
    assert "Add" in toy.registry and len(toy.registry) == 7
    with pytest.raises(ValueError, match="two node classes"):
        NodeRegistry.from_nodes(
            toy.registry["Add"], toy.registry["Scale"].__class__("Add", (), (), lambda ctx: ())
        )
