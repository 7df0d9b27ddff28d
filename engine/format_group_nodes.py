"""Legacy group nodes of the ComfyUI editor, expanded into plain UI-format nodes.

Before subgraphs, the editor could fold nodes into a *group node*: its type is
``workflow>NAME`` (``workflow/NAME`` in older files) and its definition is
``extra.groupNodes[NAME]`` (see :mod:`~diffsplit.engine.format_group_layout`).
:func:`expand_group_nodes` returns a document in which every active group node
is replaced by its inner nodes, which the UI converter then reads as usual,
giving the graph the editor queues:

- inner node ``i`` of group node ``37`` gets the id ``"37:i"`` (its index in the
  definition), so two uses of one group never share ids;
- the group node's ``widgets_values`` are dealt out to the inner widgets in the
  group's widget order (a seed's "control after generate" value and an upload
  button's value skipped); a value the list does not reach takes the inner
  class's default, as the editor's widget starts with it; a PrimitiveNode inside
  takes its value and feeds it on; widgets the group does not show keep the
  inner node's own value;
- the group's inputs (matched by name, else by position) feed the inner inputs
  they stand for; a link into a group widget that was converted to an input
  feeds that inner widget (a link wins over a value);
- links leaving the group come from the inner output behind the group output
  (Reroutes inside are followed by the converter);
- a muted or bypassed group node is kept as it is (the converter drops it, and
  bypass passes its inputs through by type), as the editor does; the group node's
  ``diffsplit.remote`` property goes to inner nodes without their own.

A group node whose definition is missing is an error naming the node and the group.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.format_group_layout import (
    PRIMITIVE,
    REROUTE,
    GroupLayout,
    GroupWidget,
    entry_name,
    group_layout,
)

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry

#: The type prefixes of group nodes: ``workflow>`` (current editors) and ``workflow/`` (before v1.2.63).
GROUP_PREFIXES = ("workflow>", "workflow/")
MODE_MUTED = 2
MODE_BYPASSED = 4
REMOTE_PROPERTY = "diffsplit.remote"
_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})


def group_name(node_type: Any) -> str | None:
    """The group a node type names (``workflow>NAME`` → ``NAME``), or None for other types."""
    if isinstance(node_type, str):
        for prefix in GROUP_PREFIXES:
            if node_type.startswith(prefix):
                return node_type[len(prefix):]
    return None


def group_definitions(document: Mapping[str, Any]) -> Mapping[str, Any]:
    """The document's ``extra.groupNodes`` (empty when it has none)."""
    extra = document.get("extra")
    definitions = extra.get("groupNodes") if isinstance(extra, Mapping) else None
    if definitions is None:
        return {}
    if not isinstance(definitions, Mapping):
        raise WorkflowError("'extra.groupNodes' must be an object")
    return definitions


def expand_group_nodes(document: Mapping[str, Any], registry: NodeRegistry) -> Mapping[str, Any]:
    """``document`` with every active group node replaced by its inner nodes (see module doc)."""
    nodes = document.get("nodes") or []
    active = [
        raw for raw in nodes
        if isinstance(raw, Mapping) and group_name(raw.get("type")) is not None
        and raw.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)
    ]
    if not active:
        return document
    links = document.get("links") or []
    if not isinstance(links, list):
        raise WorkflowError("UI workflow 'links' must be a list")
    expander = _Expander(group_definitions(document), registry, links)
    out_nodes: list[Any] = []
    out_links: list[Any] = []
    expanded = {str(raw.get("id")): raw for raw in active}
    active_objects = {id(raw) for raw in active}
    for raw in nodes:
        if id(raw) in active_objects:
            inner_nodes, inner_links = expander.expand(raw)
            out_nodes.extend(inner_nodes)
            out_links.extend(inner_links)
        else:
            out_nodes.append(raw)
    out_links[:0] = [expander.rerouted(row, expanded) for row in links]
    result = {key: value for key, value in document.items() if key not in ("nodes", "links")}
    result["nodes"] = out_nodes
    result["links"] = out_links
    return result


_LINK_KEYS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _link_fields(row: Any) -> list[Any] | None:
    if isinstance(row, Mapping):
        return [row.get(key) for key in _LINK_KEYS]
    if isinstance(row, list) and len(row) >= 6:
        return list(row[:6])
    return None


class _Expander:
    """Expands the group nodes of one document; fresh link ids continue after the document's own."""

    def __init__(self, definitions: Mapping[str, Any], registry: NodeRegistry, links: Sequence[Any]) -> None:
        self.definitions = definitions
        self.registry = registry
        self.layouts: dict[str, GroupLayout] = {}
        used = [fields[0] for fields in map(_link_fields, links) if fields is not None]
        start = max((value for value in used if isinstance(value, int) and not isinstance(value, bool)),
                    default=0)
        self._ids: Iterator[int] = itertools.count(start + 1)
        self.output_origins: dict[tuple[str, int], tuple[str, int]] = {}

    def layout(self, raw: Mapping[str, Any]) -> GroupLayout:
        name = group_name(raw.get("type"))
        assert name is not None
        if name not in self.layouts:
            if name not in self.definitions:
                raise WorkflowError(
                    f"group node {name!r} has no definition: extra.groupNodes has no entry {name!r}"
                    + (f" (it defines {', '.join(map(repr, self.definitions))})" if self.definitions else ""),
                    node_id=str(raw.get("id")), class_type=str(raw.get("type")),
                )
            try:
                self.layouts[name] = group_layout(name, self.definitions[name], self.registry)
            except WorkflowError as exc:
                raise WorkflowError(exc.reason, node_id=str(raw.get("id")), class_type=str(raw.get("type")),
                                    input_name=exc.input_name) from exc
        return self.layouts[name]

    def rerouted(self, row: Any, expanded: Mapping[str, Mapping[str, Any]]) -> Any:
        """An outer link row, coming from the inner output when it leaves a group node."""
        fields = _link_fields(row)
        if fields is None or str(fields[1]) not in expanded:
            return row
        origin = self.output_origins.get((str(fields[1]), _slot(fields[2])))
        if origin is None:
            raw = expanded[str(fields[1])]
            reason = f"link {fields[0]} leaves from output {fields[2]}, which the group node lacks"
            raise WorkflowError(reason, node_id=str(raw.get("id")), class_type=str(raw.get("type")))
        return [fields[0], origin[0], origin[1], *fields[3:6]]

    def expand(self, raw: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        """The inner nodes and internal links of one group node."""
        layout = self.layout(raw)
        outer_id = str(raw.get("id"))
        prefix = f"{outer_id}:"
        for slot, (index, inner_slot) in enumerate(layout.outputs):
            self.output_origins[(outer_id, slot)] = (f"{prefix}{index}", inner_slot)
        internal_ids = [next(self._ids) for _ in layout.links]
        feeds: dict[tuple[int, int], int] = {}
        links: list[list[Any]] = []
        for link_id, link in zip(internal_ids, layout.links, strict=True):
            feeds[(link.target, link.target_slot)] = link_id
            links.append([link_id, f"{prefix}{link.origin}", link.origin_slot, f"{prefix}{link.target}",
                          link.target_slot, link.type])
        outer_links = _outer_links(raw, layout)
        values = _widget_values(raw, layout)
        remote = (raw.get("properties") or {}).get(REMOTE_PROPERTY)
        as_inputs = {(g.target, g.input_name) for g in layout.inputs}
        nodes = []
        for index, inner in enumerate(layout.nodes):
            node = _inner_node(inner, f"{prefix}{index}", index, feeds, remote)
            for group_input in (g for g in layout.inputs if g.target == index):
                _feed(node, group_input.input_name, outer_links.get(group_input.name))
            for widget in (w for w in layout.widgets if w.target == index and w.input_name is not None):
                # a group widget the user turned into an input: its link feeds the inner widget
                if widget.name in outer_links and (index, widget.input_name) not in as_inputs:
                    _feed(node, widget.input_name, outer_links[widget.name], widget=True)
            self._set_widgets(node, inner, index, layout, values)
            nodes.append(node)
        return nodes, links

    def _set_widgets(
        self, node: dict[str, Any], inner: Mapping[str, Any], index: int, layout: GroupLayout,
        values: Mapping[GroupWidget, Any],
    ) -> None:
        """The inner node's widget values: the group's where it shows the widget, else its own."""
        kind = inner["type"]
        shown = [w for w in layout.widgets if w.target == index and not w.placeholder]
        if kind == PRIMITIVE:
            own = inner.get("widgets_values")
            value = values[shown[0]] if shown and shown[0] in values else (own[0] if own else None)
            node["widgets_values"] = [value, "fixed"]
            return
        if kind not in self.registry:
            return
        from diffsplit.engine.format_ui import widget_values_by_name

        node_class = self.registry[kind]
        merged = widget_values_by_name(inner, node_class)
        for widget in shown:
            spec = node_class.input(str(widget.input_name))
            if widget in values:
                merged[str(widget.input_name)] = values[widget]
            elif spec is not None and spec.default is not None:
                merged[spec.name] = spec.default
        node["widgets_values"] = merged


def _slot(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _outer_links(raw: Mapping[str, Any], layout: GroupLayout) -> dict[str, Any]:
    """The link feeding each group input and converted group widget, by the editor's name.

    Entries are matched by name; an entry whose name the group does not know
    stands, by its position among the plain (non-widget) entries, for that group input.
    """
    entries = [e for e in raw.get("inputs") or [] if isinstance(e, Mapping)]
    known = {g.name for g in layout.inputs} | {w.name for w in layout.widgets}
    found: dict[str, Any] = {}
    plain = [e for e in entries if not isinstance(e.get("widget"), Mapping)]
    for position, entry in enumerate(plain):
        name = entry_name(entry)
        if name not in known and position < len(layout.inputs):
            found.setdefault(layout.inputs[position].name, entry.get("link"))
    for entry in entries:
        name = entry_name(entry)
        if name in known and (entry.get("link") is not None or name not in found):
            found[name] = entry.get("link")
    return found


def _widget_values(raw: Mapping[str, Any], layout: GroupLayout) -> dict[GroupWidget, Any]:
    """The group node's widget values by widget (positional list, or an object by name)."""
    values = raw.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {w: values[w.name] for w in layout.widgets if w.name in values}
    if not isinstance(values, list):
        raise WorkflowError(f"widgets_values must be a list or an object, got {type(values).__name__}",
                            node_id=str(raw.get("id")), class_type=str(raw.get("type")))
    found: dict[GroupWidget, Any] = {}
    position = 0
    for widget in layout.widgets:
        if position >= len(values):
            break
        found[widget] = values[position]
        position += 1
        if widget.control and position < len(values) and _is_control(values[position]):
            position += 1
    return found


def _is_control(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value in _CONTROL_VALUES)


def _inner_node(
    inner: Mapping[str, Any], node_id: str, index: int, feeds: Mapping[tuple[int, int], int], remote: Any
) -> dict[str, Any]:
    node = {key: value for key, value in inner.items() if key not in ("index", "widgets_values")}
    node["id"] = node_id
    node["mode"] = inner.get("mode", 0)
    node["inputs"] = [
        {**entry, "link": feeds.get((index, slot))} if isinstance(entry, Mapping) else entry
        for slot, entry in enumerate(inner.get("inputs") or [])
    ]
    if inner["type"] == REROUTE and not node["inputs"]:
        node["inputs"] = [{"name": "", "type": "*", "link": None}]
    node["outputs"] = [
        {**entry, "links": []} if isinstance(entry, Mapping) else entry
        for entry in inner.get("outputs") or []
    ]
    properties = dict(inner.get("properties") or {})
    if remote and REMOTE_PROPERTY not in properties:
        properties[REMOTE_PROPERTY] = remote
    node["properties"] = properties
    return node


def _feed(node: dict[str, Any], input_name: str, link: Any, *, widget: bool = False) -> None:
    """Point the inner input ``input_name`` (a Reroute's: its only input) at ``link``."""
    if link is None:
        return
    inputs: list[Any] = node["inputs"]
    if node["type"] == REROUTE:
        inputs[0] = {**inputs[0], "link": link}
        return
    for slot, entry in enumerate(inputs):
        if isinstance(entry, Mapping) and entry_name(entry) == input_name:
            inputs[slot] = {**entry, "link": link}
            return
    entry = {"name": input_name, "type": "*", "link": link}
    if widget:
        entry["widget"] = {"name": input_name}
    inputs.append(entry)
