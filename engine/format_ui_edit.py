"""Writing a changed input back into a UI-format document (``--set`` in the PNG's embedded workflow).

A run's PNG carries the UI form of the workflow; when the command line changed
an input, the saved UI form must say so too, or opening the image in the
editor gives another picture. :func:`set_widget_value` returns a copy of the
document with one widget value changed where the editor keeps it:

- in the node's ``widgets_values`` (by name for the dict form; by position for
  the list form, the "control after generate" slot after a seed counted as the
  editor writes it, missing slots filled with the class's defaults);
- when the input is fed by a PrimitiveNode that feeds nothing else, in that
  primitive's value (the node's own slot would lose to the link);
- for a node inside a subgraph (id ``"20:2:1"``), in the subgraph's definition;
- for a node inside a legacy group node (id ``"37:1"``), in the group node's
  ``widgets_values`` (:mod:`~diffsplit.engine.format_group_edit`; needs the registry).

Inputs that are links to other nodes are not widgets: the document is returned
unchanged for them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffsplit.engine.format_group_edit import set_group_widget
from diffsplit.engine.format_subgraphs import subgraph_definitions

if TYPE_CHECKING:
    from diffsplit.engine.nodes.base import NodeClass
    from diffsplit.engine.nodes.registry import NodeRegistry

_CONTROL_WORDS = frozenset({"fixed", "increment", "decrement", "randomize"})


def set_widget_value(
    document: Mapping[str, Any], node_id: str, node_class: NodeClass, input_name: str, value: Any,
    registry: NodeRegistry | None = None,
) -> dict[str, Any]:
    """A copy of ``document`` with ``input_name`` of node ``node_id`` set to ``value`` (see module doc)."""
    edited = copy.deepcopy(dict(document))
    path = node_id.split(":")
    graph, raw = _find(edited, path)
    if raw is None or graph is None:
        group = _find(edited, path[:-1])[1] if len(path) > 1 and path[-1].isdecimal() else None
        if group is not None and registry is not None:  # an inner node of a legacy group node
            set_group_widget(edited, group, int(path[-1]), input_name, value, registry)
        return edited
    primitive = _sole_primitive(graph, raw, input_name)
    if primitive is not None:
        values = primitive.get("widgets_values")
        primitive["widgets_values"] = [value, *(values[1:] if isinstance(values, list) else [])]
        return edited
    names = [spec.name for spec in node_class.widget_inputs]
    if input_name not in names:
        return edited
    values = raw.get("widgets_values")
    if isinstance(values, Mapping):
        raw["widgets_values"] = {**values, input_name: value}
        return edited
    raw["widgets_values"] = _positional_with(values if isinstance(values, list) else [], node_class,
                                             input_name, value)
    return edited


def _find(document: dict[str, Any], path: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The graph (document or subgraph definition) holding the node at ``path``, and the node."""
    definitions = subgraph_definitions(document)
    graph: dict[str, Any] = document
    for depth, part in enumerate(path):
        raw = next((n for n in graph.get("nodes") or [] if isinstance(n, dict) and str(n.get("id")) == part),
                   None)
        if raw is None:
            return None, None
        if depth == len(path) - 1:
            return graph, raw
        inner = definitions.get(str(raw.get("type")))
        if not isinstance(inner, dict):
            return None, None
        graph = inner
    return None, None


def _sole_primitive(
    graph: Mapping[str, Any], raw: Mapping[str, Any], input_name: str
) -> dict[str, Any] | None:
    entry = next(
        (e for e in raw.get("inputs") or [] if isinstance(e, Mapping)
         and (e.get("name") == input_name or (e.get("widget") or {}).get("name") == input_name)),
        None,
    )
    if entry is None or entry.get("link") is None:
        return None
    links = [row for row in graph.get("links") or [] if _link_id(row) == entry["link"]]
    if len(links) != 1:
        return None
    origin = _link_origin(links[0])
    source = next((n for n in graph.get("nodes") or [] if isinstance(n, dict) and str(n.get("id")) == origin),
                  None)
    if source is None or source.get("type") != "PrimitiveNode":
        return None
    fed = [link for output in source.get("outputs") or [] if isinstance(output, Mapping)
           for link in output.get("links") or []]
    return source if len(fed) <= 1 else None


def _link_id(row: Any) -> Any:
    return row.get("id") if isinstance(row, Mapping) else row[0] if isinstance(row, list) and row else None


def _link_origin(row: Any) -> str:
    return str(row.get("origin_id") if isinstance(row, Mapping) else row[1])


def _positional_with(values: list[Any], node_class: NodeClass, input_name: str, value: Any) -> list[Any]:
    """``values`` with the slot of ``input_name`` set, laid out as the editor writes them."""
    result: list[Any] = []
    position = 0
    for spec in node_class.widget_inputs:
        current = values[position] if position < len(values) else spec.default
        position += 1
        result.append(value if spec.name == input_name else current)
        if spec.control_after_generate:
            has_control = position < len(values) and (
                isinstance(values[position], bool) or values[position] in _CONTROL_WORDS
            )
            result.append(values[position] if has_control else "fixed")
            position += 1 if has_control else 0
    return result + values[position:]
