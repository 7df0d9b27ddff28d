"""Input overrides from the command line: ``--set 12.steps=4``, ``--set KSampler.cfg=6.5``.

An override is ``NODE.INPUT=VALUE``. ``NODE`` is a node id, or else a title or a
class name that names exactly one node. ``VALUE`` is parsed as JSON (``4``,
``6.5``, ``true``, ``"text"``) and falls back to the raw string (``euler``).
A workflow loaded from the UI format also gets the change in the UI form its
PNGs embed (:mod:`.format_ui_edit`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Node, Workflow

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry


def parse_set_option(text: str) -> tuple[str, Any]:
    """Split ``"NODE.INPUT=VALUE"`` into ``("NODE.INPUT", parsed value)``."""
    target, separator, raw_value = text.partition("=")
    node_part, dot, input_part = target.strip().partition(".")
    if not separator or not dot or not node_part or not input_part:
        raise WorkflowError(f"override {text!r} is not of the form NODE.INPUT=VALUE (e.g. 12.steps=4)")
    return f"{node_part}.{input_part}", parse_value(raw_value)


def parse_set_options(texts: Iterable[str]) -> dict[str, Any]:
    """Parse several ``NODE.INPUT=VALUE`` texts; a later one wins over an earlier one."""
    return dict(parse_set_option(text) for text in texts)


def parse_value(raw: str) -> Any:
    """A value given on the command line: JSON when it parses, else the string itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply_overrides(
    workflow: Workflow, overrides: Mapping[str, Any], registry: NodeRegistry | None = None
) -> Workflow:
    """A copy of ``workflow`` with each ``"NODE.INPUT"`` set to its value.

    The input must already be set on the node, or (when ``registry`` is given) be
    declared by the node's class. Unknown nodes or inputs raise a WorkflowError
    naming them and listing what exists.
    """
    result = workflow
    for key, value in overrides.items():
        selector, dot, input_name = key.partition(".")
        if not dot or not input_name:
            raise WorkflowError(f"override key {key!r} is not of the form NODE.INPUT")
        node = find_node(result, selector)
        allowed = set(node.inputs)
        if registry is not None and node.class_type in registry:
            allowed |= {spec.name for spec in registry[node.class_type].inputs}
        if input_name not in allowed:
            raise WorkflowError(
                f"cannot set unknown input; inputs: {', '.join(sorted(allowed)) or '(none)'}",
                node_id=node.id,
                class_type=node.class_type,
                input_name=input_name,
            )
        result = result.with_node(node.with_inputs(**{input_name: value}))
        result = _with_saved_form_updated(result, node.id, input_name, value, registry)
    return result


def _with_saved_form_updated(
    workflow: Workflow, node_id: str, input_name: str, value: Any, registry: NodeRegistry | None
) -> Workflow:
    """The UI form a PNG embeds, changed like the graph (so the editor reopens what ran)."""
    saved = workflow.extra.get("workflow")
    node = workflow.nodes[node_id]
    if not isinstance(saved, Mapping) or registry is None or node.class_type not in registry:
        return workflow
    from diffsplit.engine.format_ui_edit import set_widget_value

    edited = set_widget_value(saved, node_id, registry[node.class_type], input_name, value, registry=registry)
    return dataclasses.replace(workflow, extra={**workflow.extra, "workflow": edited})


def find_node(workflow: Workflow, selector: str) -> Node:
    """The node named by ``selector``: an id, else a unique title, else a unique class name."""
    if selector in workflow.nodes:
        return workflow.nodes[selector]
    for attribute in ("title", "class_type"):
        matches = [node for node in workflow.nodes.values() if getattr(node, attribute) == selector]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(node.id for node in matches)
            raise WorkflowError(f"{selector!r} names several nodes ({ids}); use a node id")
    described = ", ".join(f"{node.id} ({node.title})" for node in workflow.nodes.values())
    raise WorkflowError(f"no node {selector!r} in the workflow; nodes: {described or '(none)'}")
