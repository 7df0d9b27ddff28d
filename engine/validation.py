"""Checking a workflow against the node registry (and, optionally, the model store).

Every problem is a :class:`WorkflowError` naming the node id, its class and the
input at fault. Nodes are checked in natural id order and the first problem is
raised, so the same broken workflow always reports the same error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Link, Node, Workflow, node_sort_key
from diffsplit.engine.nodes.base import InputSpec, NodeClass

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry
    from diffsplit.engine.store import ModelStore

#: A COMBO widget converted to an input accepts links of these types.
_COMBO_LINK_TYPES = frozenset({"STRING", "COMBO", "*"})
_MAX_LISTED = 20


def link_types_compatible(output_type: str, input_type: str) -> bool:
    """Whether an output of ``output_type`` may feed an input declared as ``input_type``.

    ``*`` matches anything; comma-separated types (``"IMAGE,MASK"``) match any
    member; a COMBO input also accepts STRING and COMBO outputs.
    """
    outputs = {part.strip() for part in output_type.split(",")}
    inputs = {part.strip() for part in input_type.split(",")}
    if "*" in outputs or "*" in inputs or outputs & inputs:
        return True
    return "COMBO" in inputs and bool(outputs & _COMBO_LINK_TYPES)


def validate_workflow(
    workflow: Workflow,
    registry: NodeRegistry,
    store: ModelStore | None = None,
    *,
    only: Iterable[str] | None = None,
) -> None:
    """Raise a WorkflowError for the first problem in ``workflow``.

    Checked: unknown class; unknown, missing or ill-typed inputs; links to missing
    nodes or outputs; link type mismatches; values out of range or not among a
    COMBO's choices; model files missing from ``store`` (when given); cycles.
    ``only`` limits the per-node checks to those node ids (the executor passes the
    nodes it will run; their links may point at nodes outside that set).
    """
    checked = workflow.nodes if only is None else {node_id: workflow.node(node_id) for node_id in only}
    checker = _Checker(workflow, registry, store)
    for node_id in sorted(checked, key=node_sort_key):
        checker.check_node(checked[node_id])
    workflow.restricted_to(checked).topological_order()


class _Checker:
    """Per-node checks, with the store's folder listings fetched once per validation."""

    def __init__(self, workflow: Workflow, registry: NodeRegistry, store: ModelStore | None) -> None:
        self.workflow = workflow
        self.registry = registry
        self.store = store
        self.folder_names: dict[str, list[str]] = {}

    def check_node(self, node: Node) -> None:
        node_class = required_class(self.registry, node)
        declared = [spec.name for spec in node_class.inputs]
        for name in node.inputs:
            if node_class.input(name) is None:
                listing = ", ".join(declared) or "(none)"
                raise self.error(node, name, f"unknown input; {node_class.name} declares: {listing}")
        for spec in node_class.inputs:
            if spec.name not in node.inputs:
                if not spec.optional:
                    raise self.error(node, spec.name, f"required input ({spec.type}) is missing")
                continue
            value = node.inputs[spec.name]
            if isinstance(value, Link):
                self.check_link(node, spec, value)
            else:
                self.check_value(node, spec, value)

    def check_link(self, node: Node, spec: InputSpec, link: Link) -> None:
        source = self.workflow.nodes.get(link.node_id)
        if source is None:
            raise self.error(node, spec.name, f"links to node {link.node_id}, which is not in the workflow")
        outputs = required_class(self.registry, source).outputs
        if not 0 <= link.output_index < len(outputs):
            names = ", ".join(output.type for output in outputs) or "none"
            raise self.error(
                node,
                spec.name,
                f"links to output {link.output_index} of node {source.id} ({source.class_type}), "
                f"which has {len(outputs)} output(s): {names}",
            )
        output_type = outputs[link.output_index].type
        if not link_types_compatible(output_type, spec.type):
            raise self.error(
                node,
                spec.name,
                f"expects {spec.type}, but output {link.output_index} of node {source.id} "
                f"({source.class_type}) is {output_type}",
            )

    def check_value(self, node: Node, spec: InputSpec, value: Any) -> None:
        kind = spec.type
        if kind == "*":
            return
        if not spec.is_widget:
            raise self.error(node, spec.name, f"expects a link from a {kind} output, got the value {value!r}")
        expected = {
            "INT": (isinstance(value, int) and not isinstance(value, bool), "an integer"),
            "FLOAT": (isinstance(value, int | float) and not isinstance(value, bool), "a number"),
            "STRING": (isinstance(value, str), "a string"),
            "BOOLEAN": (isinstance(value, bool), "true or false"),
        }.get(kind)
        if expected is not None and not expected[0]:
            raise self.error(node, spec.name, f"expects {kind} ({expected[1]}), got {value!r}")
        if kind in {"INT", "FLOAT"}:
            if not math.isfinite(value):
                raise self.error(node, spec.name, f"value {value!r} is not a finite number")
            if spec.min is not None and value < spec.min:
                raise self.error(node, spec.name, f"value {value!r} is below the minimum {spec.min:g}")
            if spec.max is not None and value > spec.max:
                raise self.error(node, spec.name, f"value {value!r} is above the maximum {spec.max:g}")
        if kind == "COMBO":
            self.check_choice(node, spec, value)

    def check_choice(self, node: Node, spec: InputSpec, value: Any) -> None:
        if spec.choices is not None and value not in spec.choices:
            raise self.error(
                node, spec.name, f"{value!r} is not one of the choices: {_listing(list(spec.choices))}"
            )
        if spec.model_folder is None or self.store is None:
            return
        names = self.folder_names.get(spec.model_folder)
        if names is None:
            names = self.store.names(spec.model_folder)
            self.folder_names[spec.model_folder] = names
        if value not in names:
            raise self.error(
                node,
                spec.name,
                f'{spec.name} "{value}" not found in {spec.model_folder}/; available: {_listing(names)}',
            )

    @staticmethod
    def error(node: Node, input_name: str, reason: str) -> WorkflowError:
        return WorkflowError(reason, node_id=node.id, class_type=node.class_type, input_name=input_name)


def _listing(names: list[str]) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(str(name) for name in names[:_MAX_LISTED])
    return shown + (f", … ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def required_class(registry: NodeRegistry, node: Node) -> NodeClass:
    """The node's class, or a WorkflowError naming the node when the class is unknown."""
    if node.class_type not in registry:
        raise WorkflowError(
            registry.unknown_class_message(node.class_type), node_id=node.id, class_type=node.class_type
        )
    return registry[node.class_type]


def check_node_values(
    registry: NodeRegistry, node_id: str, class_type: str, values: Mapping[str, Any]
) -> None:
    """Raise a WorkflowError for the first of ``values`` that a local run would refuse.

    ``values`` are one node's inputs as received (a worker's ``run_node``): an
    input the class does not declare is refused, and every widget input
    (INT, FLOAT, STRING, BOOLEAN, COMBO) is checked for its type, range and
    choices exactly as :func:`validate_workflow` checks literal values. Other
    inputs (models, tensors) are left to the caller.
    """
    node = Node(node_id, class_type, {})
    node_class = required_class(registry, node)
    checker = _Checker(Workflow({}), registry, None)
    declared = ", ".join(spec.name for spec in node_class.inputs) or "(none)"
    for name in values:
        spec = node_class.input(name) if isinstance(name, str) else None
        if spec is None:
            reason = f"unknown input; {node_class.name} declares: {declared}"
            raise checker.error(node, str(name)[:64], reason)
        if spec.is_widget:
            checker.check_value(node, spec, values[name])
