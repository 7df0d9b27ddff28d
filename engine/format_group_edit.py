"""Writing a changed inner input back into a legacy group node's ``widgets_values`` (``--set 37:1.seed=5``).

The editor keeps the widget values of a group node's inner nodes on the group
node itself, in the group's widget order (see
:mod:`~diffsplit.engine.format_group_layout`). :func:`set_group_widget` puts a
new value in that list where the editor reads it (a value fed by a
PrimitiveNode inside the group: the primitive's slot), writing the slots
before it when the list was short (their defaults, as the editor fills them;
``"fixed"`` after a seed) so the list stays aligned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.format_group_layout import PRIMITIVE, GroupLayout, GroupWidget, entry_name, group_layout
from diffsplit.engine.format_group_nodes import group_definitions, group_name

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry

_CONTROL_WORDS = frozenset({"fixed", "increment", "decrement", "randomize"})
_UPLOAD_VALUE = "image"


def set_group_widget(
    document: Mapping[str, Any], group_node: dict[str, Any], index: int, input_name: str, value: Any,
    registry: NodeRegistry,
) -> bool:
    """Set inner node ``index``'s ``input_name`` on ``group_node`` (in place); False when it is no widget."""
    name = group_name(group_node.get("type"))
    definitions = group_definitions(document)
    if name is None or name not in definitions:
        return False
    try:
        layout = group_layout(name, definitions[name], registry)
    except WorkflowError:
        return False
    widget = _widget_for(layout, index, input_name)
    if widget is None:
        return False
    values = group_node.get("widgets_values")
    if isinstance(values, Mapping):
        group_node["widgets_values"] = {**values, widget.name: value}
        return True
    group_node["widgets_values"] = _positional_with(
        values if isinstance(values, list) else [], layout, widget, value, registry
    )
    return True


def _widget_for(layout: GroupLayout, index: int, input_name: str) -> GroupWidget | None:
    """The group widget that sets ``input_name`` of inner node ``index`` (or the primitive feeding it)."""
    for widget in layout.widgets:
        if widget.target == index and widget.input_name == input_name:
            return widget
    if not 0 <= index < len(layout.nodes):
        return None
    entries = layout.nodes[index].get("inputs") or []
    for link in layout.links:
        if link.target != index or link.target_slot >= len(entries):
            continue
        entry = entries[link.target_slot]
        fed = isinstance(entry, Mapping) and entry_name(entry) == input_name
        if fed and layout.nodes[link.origin]["type"] == PRIMITIVE:
            return next((w for w in layout.widgets if w.target == link.origin), None)
    return None


def _default(layout: GroupLayout, widget: GroupWidget, registry: NodeRegistry) -> Any:
    """What the editor's widget holds before a value is loaded into it."""
    inner = layout.nodes[widget.target]
    if widget.placeholder:
        return _UPLOAD_VALUE
    if widget.input_name is None:  # a PrimitiveNode's value
        own = inner.get("widgets_values")
        return own[0] if isinstance(own, list) and own else None
    spec = registry[inner["type"]].input(widget.input_name)
    if spec is not None and spec.default is not None:
        return spec.default
    from diffsplit.engine.format_ui import widget_values_by_name

    return widget_values_by_name(inner, registry[inner["type"]]).get(widget.input_name)


def _positional_with(
    values: list[Any], layout: GroupLayout, target: GroupWidget, value: Any, registry: NodeRegistry
) -> list[Any]:
    result: list[Any] = []
    position = 0
    for widget in layout.widgets:
        current = values[position] if position < len(values) else _default(layout, widget, registry)
        position += 1
        result.append(value if widget == target else current)
        if widget.control:
            has_control = position < len(values) and (
                isinstance(values[position], bool) or values[position] in _CONTROL_WORDS
            )
            result.append(values[position] if has_control else "fixed")
            position += 1 if has_control else 0
    return result + values[position:]
