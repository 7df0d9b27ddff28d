"""What the ComfyUI editor derives from a legacy group-node definition: its widgets, inputs and outputs.

A group node (type ``workflow>NAME``, older files ``workflow/NAME``) is defined
once in ``extra.groupNodes[NAME]``: the inner ``nodes`` (a node's index in that
list is its id inside the group), the internal ``links`` as rows
``[origin index, origin slot, target index, target slot, outer origin id, type]``
(an origin index of ``null`` marks a link that came from outside the group),
``external`` (``[index, slot, type]`` of inner outputs that also leave the
group) and ``config`` (per inner index: input/output names and visibility).

:func:`group_layout` walks the inner nodes in order, as the editor's
``GroupNodeConfig.registerType`` does:

- an inner widget becomes a widget of the group node, in order (a seed widget is
  followed by its "control after generate" value, LoadImage-style nodes by their
  upload button), unless it was converted to an input; converted widgets that no
  internal link feeds come after all other widgets, and are inputs of the group too;
- an inner input that no internal link feeds becomes an input of the group;
- an inner output becomes an output of the group unless only internal links use it;
- a Reroute is a pass-through input/output (skipped when both its ends are
  inside), a PrimitiveNode that feeds something is one widget (its value);
  other virtual nodes (Note) take no part.

Names follow the editor (a ``config`` name, the input's label, or the input
name; repeated names get the inner node's title or type in front), so inputs and
widgets of the saved group node can be matched by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError

if TYPE_CHECKING:
    from diffsplit.engine.nodes.base import InputSpec, NodeClass
    from diffsplit.engine.nodes.registry import NodeRegistry

REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
#: Node types the editor draws but never runs; inside a group they take no part.
VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote"})
#: Classes whose image input comes with an upload button, one more widget value at the end of their widgets.
IMAGE_UPLOAD_CLASSES = frozenset({"LoadImage", "LoadImageMask"})
#: Input names the editor always follows with a "control after generate" widget.
SEED_NAMES = frozenset({"seed", "noise_seed"})


@dataclass(frozen=True)
class InternalLink:
    """A link between two inner nodes of a group (by index in the definition's ``nodes``)."""

    origin: int
    origin_slot: int
    target: int
    target_slot: int
    type: str


@dataclass(frozen=True)
class GroupWidget:
    """One widget of the group node.

    ``target`` is the inner node index; ``input_name`` the inner widget it sets
    (None for a PrimitiveNode's value and for an upload button, whose value is not an input).
    """

    target: int
    input_name: str | None
    name: str
    control: bool = False
    placeholder: bool = False


@dataclass(frozen=True)
class GroupInput:
    """One input slot of the group node: which inner node input it feeds."""

    target: int
    input_name: str
    name: str


@dataclass(frozen=True)
class GroupLayout:
    """A group definition as the editor presents it: inner nodes, links, widgets, inputs, outputs."""

    name: str
    nodes: tuple[Mapping[str, Any], ...]
    links: tuple[InternalLink, ...]
    widgets: tuple[GroupWidget, ...]
    inputs: tuple[GroupInput, ...]
    #: ``(inner index, inner output slot)`` of each group output, in order
    outputs: tuple[tuple[int, int], ...]


def input_entries(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A UI node's ``inputs`` entries (non-objects dropped)."""
    return [entry for entry in node.get("inputs") or [] if isinstance(entry, Mapping)]


def entry_name(entry: Mapping[str, Any]) -> str:
    """The input an entry feeds: its widget's name for a converted widget, else its name."""
    widget = entry.get("widget")
    if isinstance(widget, Mapping) and widget.get("name") is not None:
        return str(widget["name"])
    return str(entry.get("name"))


def group_layout(name: str, definition: Any, registry: NodeRegistry) -> GroupLayout:
    """The layout of group ``name`` from its ``extra.groupNodes`` entry."""
    if not isinstance(definition, Mapping):
        raise WorkflowError(f"group node definition {name!r} must be an object")
    nodes = definition.get("nodes")
    links = definition.get("links") or []
    if not isinstance(nodes, list) or not isinstance(links, list):
        raise WorkflowError(f"group node definition {name!r}: 'nodes' and 'links' must be lists")
    for index, node in enumerate(nodes):
        if not isinstance(node, Mapping) or not isinstance(node.get("type"), str):
            raise WorkflowError(f"group node definition {name!r}: inner node {index} has no type")
    return _LayoutBuilder(name, definition, tuple(nodes), registry).build(links)


class _LayoutBuilder:
    """One walk over a definition's inner nodes, in the editor's order."""

    def __init__(
        self, name: str, definition: Mapping[str, Any], nodes: tuple[Mapping[str, Any], ...],
        registry: NodeRegistry,
    ) -> None:
        self.name = name
        self.nodes = nodes
        self.registry = registry
        config = definition.get("config")
        self.config: Mapping[str, Any] = config if isinstance(config, Mapping) else {}
        self.external = _external_outputs(definition.get("external"))
        self.seen: dict[str, int] = {}
        self.widgets: list[GroupWidget] = []
        self.inputs: list[GroupInput] = []
        self.outputs: list[tuple[int, int]] = []
        self.from_outside: dict[int, str] = {}
        self.links: tuple[InternalLink, ...] = ()

    def build(self, rows: Sequence[Any]) -> GroupLayout:
        self.links = tuple(self._parse_links(rows))
        deferred: list[tuple[int, list[tuple[int, InputSpec]]]] = []
        for index, node in enumerate(self.nodes):
            kind = node["type"]
            if kind == REROUTE:
                self._reroute(index, node)
            elif kind == PRIMITIVE:
                self._primitive(index, node)
            elif kind in VIRTUAL_TYPES:
                continue
            elif kind.startswith(("workflow>", "workflow/")):
                raise WorkflowError(
                    f"group node {self.name!r} contains the group node {kind!r}; the editor cannot "
                    "nest group nodes", class_type=kind,
                )
            elif kind not in self.registry:
                reason = f"inside group node {self.name!r}: {self.registry.unknown_class_message(kind)}"
                raise WorkflowError(reason, node_id=str(index), class_type=kind)
            else:
                deferred.append((index, self._node(index, node, self.registry[kind])))
        for index, converted in deferred:
            self._converted(index, converted)
        return GroupLayout(self.name, self.nodes, self.links, tuple(self.widgets), tuple(self.inputs),
                           tuple(self.outputs))

    def _parse_links(self, rows: Sequence[Any]) -> list[InternalLink]:
        parsed = []
        for row in rows:
            if not isinstance(row, list) or len(row) < 4:
                raise WorkflowError(f"group node definition {self.name!r}: malformed link {str(row)[:80]}")
            origin, origin_slot, target, target_slot = row[:4]
            kind = str(row[5]) if len(row) > 5 else "*"
            try:
                target, target_slot = int(target), int(target_slot)
                if origin is None:
                    self.from_outside.setdefault(target, kind)
                    continue
                link = InternalLink(int(origin), int(origin_slot), target, target_slot, kind)
            except (TypeError, ValueError):
                raise WorkflowError(
                    f"group node definition {self.name!r}: malformed link {str(row)[:80]}"
                ) from None
            if not (0 <= link.origin < len(self.nodes) and 0 <= link.target < len(self.nodes)):
                reason = f"group node definition {self.name!r}: link {row[:4]} names a missing node"
                raise WorkflowError(reason)
            parsed.append(link)
        return parsed

    # -- what feeds what -------------------------------------------------

    def _links_into(self, index: int) -> dict[int, InternalLink]:
        return {link.target_slot: link for link in self.links if link.target == index}

    def _links_from(self, index: int, slot: int | None = None) -> list[InternalLink]:
        return [link for link in self.links if link.origin == index and slot in (None, link.origin_slot)]

    def _fed_names(self, index: int) -> set[str]:
        """The inputs of inner node ``index`` that an internal link feeds."""
        entries = self.nodes[index].get("inputs") or []
        names = set()
        for slot in self._links_into(index):
            entry = entries[slot] if 0 <= slot < len(entries) else None
            if isinstance(entry, Mapping):
                names.add(entry_name(entry))
        return names

    def _output_visible(self, index: int, slot: int) -> bool:
        custom = self._custom(index, "output", str(slot))
        if isinstance(custom, Mapping) and custom.get("visible") is not None:
            return bool(custom["visible"])
        return not self._links_from(index, slot) or (index, slot) in self.external

    # -- names ---------------------------------------------------------------

    def _custom(self, index: int, kind: str, key: str) -> Any:
        entry = self.config.get(str(index))
        section = entry.get(kind) if isinstance(entry, Mapping) else None
        return section.get(key) if isinstance(section, Mapping) else None

    def _name(self, index: int, input_name: str) -> str:
        """The editor's name for an inner input on the group node (``getInputConfig``)."""
        node = self.nodes[index]
        custom = self._custom(index, "input", input_name)
        name = custom.get("name") if isinstance(custom, Mapping) else None
        if name is None:
            label = next((e.get("label") for e in input_entries(node) if e.get("name") == input_name), None)
            name = label if label is not None else input_name
        name = str(name)
        key = name
        if (node["type"] == PRIMITIVE and node.get("title")) or name in self.seen:
            prefix = f"{node.get('title') if node.get('title') is not None else node['type']} "
            key = name = f"{prefix}{input_name}"
            if name in self.seen:
                name = f"{prefix}{self.seen[name]} {input_name}"
        self.seen[key] = self.seen.get(key, 1) + 1
        return name

    def _hidden(self, index: int, input_name: str) -> bool:
        custom = self._custom(index, "input", input_name)
        return isinstance(custom, Mapping) and custom.get("visible") is False

    # -- the kinds of inner node ---------------------------------------------

    def _node(
        self, index: int, node: Mapping[str, Any], node_class: NodeClass
    ) -> list[tuple[int, InputSpec]]:
        """Widgets, inputs and outputs of a registered class; returns its converted widgets (for later)."""
        required = [spec for spec in node_class.inputs if not spec.optional]
        optional = [spec for spec in node_class.inputs if spec.optional]
        converted: list[tuple[int, InputSpec]] = []
        for spec in required:
            self._widget(index, node, spec, converted)
        if node_class.name in IMAGE_UPLOAD_CLASSES:
            self.widgets.append(GroupWidget(index, None, self._name(index, "upload"), placeholder=True))
        for spec in optional:
            self._widget(index, node, spec, converted)
        specs = required + optional
        fed = self._fed_names(index)
        for spec in specs:
            if spec.is_widget or spec.name in fed:
                continue
            name = self._name(index, spec.name)
            if not self._hidden(index, spec.name):
                self.inputs.append(GroupInput(index, spec.name, name))
        for slot in range(len(node_class.outputs)):
            if self._output_visible(index, slot):
                self.outputs.append((index, slot))
        return converted

    def _widget(
        self, index: int, node: Mapping[str, Any], spec: InputSpec, converted: list[tuple[int, InputSpec]]
    ) -> None:
        """An inner widget: a group widget now, or (converted to an input) one for later."""
        if not spec.is_widget:
            return
        entries = node.get("inputs") or []
        slot = next((i for i, e in enumerate(entries) if isinstance(e, Mapping) and e.get("name") == spec.name
                     and isinstance(e.get("widget"), Mapping) and entry_name(e) == spec.name), None)
        if slot is not None:
            converted.append((slot, spec))
            return
        control = spec.control_after_generate or spec.name in SEED_NAMES
        self.widgets.append(GroupWidget(index, spec.name, self._name(index, spec.name), control))

    def _converted(self, index: int, converted: list[tuple[int, InputSpec]]) -> None:
        """Converted widgets no internal link feeds: group widgets and inputs (after all others)."""
        fed = self._fed_names(index)
        for _, spec in sorted(converted, key=lambda item: str(item[0])):  # the editor sorts the slots as text
            if spec.name in fed:
                continue
            name = self._name(index, spec.name)
            control = spec.control_after_generate or spec.name in SEED_NAMES
            self.widgets.append(GroupWidget(index, spec.name, name, control))
            self.inputs.append(GroupInput(index, spec.name, name))

    def _reroute(self, index: int, node: Mapping[str, Any]) -> None:
        into, out = self._links_into(index), self._links_from(index)
        if into and out and (index, 0) not in self.external:
            return  # used inside only
        name = self._name(index, self._reroute_type(index, into, out))
        if 0 not in into:
            self.inputs.append(GroupInput(index, "", name))
        if self._output_visible(index, 0):
            self.outputs.append((index, 0))

    def _reroute_type(self, index: int, into: Mapping[int, InternalLink], out: Sequence[InternalLink]) -> str:
        for link in out:
            entries = self.nodes[link.target].get("inputs") or []
            entry = entries[link.target_slot] if link.target_slot < len(entries) else None
            kind = entry.get("type") if isinstance(entry, Mapping) else None
            if kind not in (None, "*"):
                return str(kind)
        if out:
            return "*"
        if 0 in into:
            origin = into[0]
            outputs = self.nodes[origin.origin].get("outputs") or []
            entry = outputs[origin.origin_slot] if origin.origin_slot < len(outputs) else None
            return str(entry.get("type", "*")) if isinstance(entry, Mapping) else "*"
        kind = self.from_outside.get(index, "*")
        return kind if kind != "*" else self.external.get((index, 0), "*")

    def _primitive(self, index: int, node: Mapping[str, Any]) -> None:
        if not self._links_from(index):
            return  # the editor skips a primitive that feeds nothing
        self.widgets.append(GroupWidget(index, None, self._name(index, "value"), control=True))
        if self._output_visible(index, 0):
            self.outputs.append((index, 0))


def _external_outputs(rows: Any) -> dict[tuple[int, int], str]:
    """``external`` rows as ``(inner index, slot) → type``; older editors stored the node, not its index."""
    found: dict[tuple[int, int], str] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, list) or len(row) < 2:
            continue
        origin = row[0].get("index") if isinstance(row[0], Mapping) else row[0]
        try:
            found[(int(origin), int(row[1]))] = str(row[2]) if len(row) > 2 else "*"
        except (TypeError, ValueError):
            continue
    return found
