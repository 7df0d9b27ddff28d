"""ComfyUI's UI ("workflow") format, as the editor saves it, converted to a :class:`Workflow`.

What the conversion does (it follows what the editor sends to the ComfyUI server):

- ``widgets_values`` (a list) map positionally onto the class's widget inputs in
  declaration order; an input with ``control_after_generate`` is followed by its
  control value (``"randomize"``, ``"fixed"``..., or legacy ``true``/``false``),
  which is skipped. Trailing extra values (upload buttons and similar) are
  ignored; missing ones (a short list, ``null``, no ``widgets_values``) take the
  class's defaults, as the editor fills them. A dict of ``widgets_values``
  (newer editors) is read by input name. ``sample_``-prefixed sampler names of
  older files are read without the prefix.
- Subgraphs (``definitions.subgraphs``, nested ones too) are flattened first:
  inner nodes get ids ``"<outer>:<inner>"``. Legacy group nodes
  (``workflow>NAME`` / ``workflow/NAME``, defined in ``extra.groupNodes``) are
  expanded next, inner node ``i`` as ``"<outer>:<i>"``
  (:mod:`~diffsplit.engine.format_group_nodes`).
- A widget converted to an input keeps its ``widgets_values`` slot; when it has a
  link, the link wins.
- ``PrimitiveNode``: its value (``widgets_values[0]``) replaces the link in every
  input it feeds. ``Reroute``: pass-through (chains are followed).
- ``Note``, ``MarkdownNote`` and ``groups`` are ignored.
- ``mode`` 2 (muted) nodes are dropped, and so are links from them. ``mode`` 4
  (bypassed) nodes are dropped and each consumer receives the bypassed node's
  input of the consumer's type (the input at the same slot first, then the first
  one of that type), as ComfyUI does.
- A node's ``properties["diffsplit.remote"]`` (e.g. ``"tcp://gpu:5555"``) becomes
  ``Node.meta["remote"]``: the node runs on that worker. ``title`` becomes
  ``Node.meta["title"]``.

The whole UI document is kept as ``Workflow.extra["workflow"]`` (saved PNGs embed it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.format_group_nodes import expand_group_nodes
from diffsplit.engine.format_subgraphs import flatten_subgraphs
from diffsplit.engine.graph import Link, Node, Workflow

if TYPE_CHECKING:
    from diffsplit.engine.nodes.base import NodeClass
    from diffsplit.engine.nodes.registry import NodeRegistry

#: The node property holding a worker address for a UI-format node.
REMOTE_PROPERTY = "diffsplit.remote"
MODE_MUTED = 2
MODE_BYPASSED = 4
IGNORED_NODE_TYPES = frozenset({"Note", "MarkdownNote"})
PRIMITIVE_NODE_TYPE = "PrimitiveNode"
REROUTE_NODE_TYPE = "Reroute"
#: The values of the editor's "control after generate" widget.
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
#: The prefix older editors saved before sampler names (``sample_dpmpp_2m``).
LEGACY_SAMPLER_PREFIX = "sample_"


def is_ui_format(document: Any) -> bool:
    """Whether ``document`` looks like a UI-format workflow."""
    return isinstance(document, Mapping) and isinstance(document.get("nodes"), list) and "links" in document


@dataclass(frozen=True)
class UiLink:
    """One row of the UI ``links`` table."""

    link_id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


@dataclass(frozen=True)
class _Literal:
    """A value that a PrimitiveNode substitutes for a link."""

    value: Any


#: What malformed JSON (a list where an object belongs, a dict where a list does) raises deep down.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)


def parse_ui_format(document: Mapping[str, Any], registry: NodeRegistry) -> Workflow:
    """The workflow described by a UI-format document; node classes come from ``registry``.

    Subgraphs are flattened first (:mod:`~diffsplit.engine.format_subgraphs`),
    then group nodes expanded (:mod:`~diffsplit.engine.format_group_nodes`);
    the workflow keeps the document as it was saved.
    """
    try:
        flat = flatten_subgraphs(document)
    except _SHAPE_ERRORS as exc:
        raise WorkflowError(f"malformed subgraph definitions ({type(exc).__name__}: {exc})") from exc
    try:
        flat = expand_group_nodes(flat, registry)
    except _SHAPE_ERRORS as exc:
        raise WorkflowError(f"malformed group node definitions ({type(exc).__name__}: {exc})") from exc
    return _UiConverter(flat, registry, saved=document).workflow()


def widget_values_by_name(raw: Mapping[str, Any], node_class: NodeClass) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto ``node_class``'s widget inputs.

    As the editor loads a file: values missing at the end (or a ``null`` or
    absent ``widgets_values``) take the class's defaults; the slot after a
    seed holds its "control after generate" value, a word or, in files from
    older editors, ``true``/``false`` (randomize/fixed); sampler and scheduler
    names of older files (``sample_euler``) are read without the prefix.
    """
    values = raw.get("widgets_values")
    specs = node_class.widget_inputs
    if values is None:
        values = []
    if isinstance(values, Mapping):
        mapped = {spec.name: values[spec.name] for spec in specs if spec.name in values}
    elif isinstance(values, list):
        mapped = _positional_widgets(values, specs)
    else:
        raise _node_error(raw, f"widgets_values must be a list or an object, got {type(values).__name__}")
    for spec in specs:
        if spec.name not in mapped and spec.default is not None:
            mapped[spec.name] = spec.default
        elif spec.name in mapped:
            mapped[spec.name] = _legacy_choice(mapped[spec.name], spec)
    return mapped


def _positional_widgets(values: list[Any], specs: tuple[Any, ...]) -> dict[str, Any]:
    mapped: dict[str, Any] = {}
    position = 0
    for spec in specs:
        if position >= len(values):
            break
        mapped[spec.name] = values[position]
        position += 1
        if spec.control_after_generate and position < len(values) and _is_control_value(values[position]):
            position += 1
    return mapped


def _is_control_value(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value in CONTROL_VALUES)


def _legacy_choice(value: Any, spec: Any) -> Any:
    """A combo value of an older editor, under its current name (``sample_euler`` → ``euler``)."""
    choices = spec.choices
    if not choices or not isinstance(value, str) or value in choices:
        return value
    bare = value.removeprefix(LEGACY_SAMPLER_PREFIX)
    return bare if bare in choices else value


def _node_error(raw: Mapping[str, Any], reason: str, input_name: str | None = None) -> WorkflowError:
    return WorkflowError(
        reason,
        node_id=str(raw.get("id")),
        class_type=str(raw.get("type")),
        input_name=input_name,
    )


class _UiConverter:
    """One conversion: the document's nodes and links indexed by id."""

    def __init__(
        self, document: Mapping[str, Any], registry: NodeRegistry, saved: Mapping[str, Any] | None = None
    ) -> None:
        self.document = document
        self.saved = saved if saved is not None else document
        self.registry = registry
        self.raw_nodes: dict[str, Mapping[str, Any]] = {}
        for raw in document["nodes"]:
            if not isinstance(raw, Mapping) or "id" not in raw or not isinstance(raw.get("type"), str):
                raise WorkflowError(f"UI node entry without an id and a type: {str(raw)[:80]}")
            node_id = str(raw["id"])
            if node_id in self.raw_nodes:
                raise _node_error(raw, "duplicate node id")
            self.raw_nodes[node_id] = raw
        links = document.get("links") or []
        if not isinstance(links, list):
            raise WorkflowError("UI workflow 'links' must be a list")
        self.links = {link.link_id: link for link in map(_parse_link, links)}
        definitions = document.get("definitions")
        subgraphs = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
        self.subgraph_ids = {
            str(entry.get("id")) for entry in (subgraphs if isinstance(subgraphs, list) else [])
            if isinstance(entry, Mapping)
        }

    def workflow(self) -> Workflow:
        nodes = [
            self.convert_checked(raw)
            for raw in self.raw_nodes.values()
            if raw["type"] not in IGNORED_NODE_TYPES | {PRIMITIVE_NODE_TYPE, REROUTE_NODE_TYPE}
            and raw.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)
        ]
        return Workflow.of(*nodes, source_format="ui", extra={"workflow": self.saved})

    def convert_checked(self, raw: Mapping[str, Any]) -> Node:
        """:meth:`convert`, with malformed JSON reported as an error naming the node."""
        try:
            return self.convert(raw)
        except _SHAPE_ERRORS as exc:
            reason = f"malformed UI node ({type(exc).__name__}: {exc}); is the file from the ComfyUI editor?"
            raise _node_error(raw, reason) from exc

    def convert(self, raw: Mapping[str, Any]) -> Node:
        class_type = raw["type"]
        if class_type in self.subgraph_ids:
            raise _node_error(raw, "a subgraph node could not be flattened")
        if class_type not in self.registry:
            raise _node_error(raw, self.registry.unknown_class_message(class_type))
        inputs: dict[str, Any] = widget_values_by_name(raw, self.registry[class_type])
        for entry in raw.get("inputs") or []:
            if not isinstance(entry, Mapping) or entry.get("link") is None:
                continue
            widget = entry.get("widget")
            is_widget = isinstance(widget, Mapping) and "name" in widget
            name = str(widget["name"] if is_widget else entry.get("name"))
            source = self.trace_source(raw, name, entry["link"], str(entry.get("type", "*")))
            if isinstance(source, _Literal):
                inputs[name] = source.value
            elif source is not None:
                inputs[name] = source
        meta: dict[str, Any] = {}
        if raw.get("title"):
            meta["title"] = raw["title"]
        remote = (raw.get("properties") or {}).get(REMOTE_PROPERTY)
        if remote:
            meta["remote"] = str(remote)
        return Node(id=str(raw["id"]), class_type=class_type, inputs=inputs, meta=meta)

    def trace_source(
        self, consumer: Mapping[str, Any], input_name: str, link_id: Any, input_type: str
    ) -> Link | _Literal | None:
        """Follow a link back through Reroutes and bypassed nodes to a real output or a primitive.

        None means the input receives nothing (a muted source, an unconnected reroute
        or a bypassed node without an input of the consumer's type).
        """
        seen: set[Any] = set()
        while True:
            if link_id in seen:
                raise _node_error(consumer, "links loop through Reroute or bypassed nodes", input_name)
            seen.add(link_id)
            link = self.links.get(link_id)
            if link is None:
                raise _node_error(consumer, f"refers to link {link_id}, which is not in 'links'", input_name)
            origin = self.raw_nodes.get(link.origin_id)
            if origin is None:
                reason = f"link {link_id} comes from node {link.origin_id}, which is missing"
                raise _node_error(consumer, reason, input_name)
            mode = origin.get("mode", 0)
            if mode == MODE_MUTED:
                return None
            if origin["type"] == PRIMITIVE_NODE_TYPE:
                values = origin.get("widgets_values") or []
                if not values:
                    raise _node_error(origin, "PrimitiveNode has no value")
                return _Literal(values[0])
            if origin["type"] == REROUTE_NODE_TYPE:
                link_id = _input_link(origin, 0)
            elif mode == MODE_BYPASSED:
                link_id = _bypass_input_link(origin, link.origin_slot, input_type)
            else:
                return Link(node_id=link.origin_id, output_index=link.origin_slot)
            if link_id is None:
                return None


def _input_link(raw: Mapping[str, Any], slot: int) -> Any:
    inputs = raw.get("inputs") or []
    return inputs[slot].get("link") if slot < len(inputs) and isinstance(inputs[slot], Mapping) else None


def _bypass_input_link(raw: Mapping[str, Any], output_slot: int, wanted_type: str) -> Any:
    """The link into a bypassed node that stands in for its output (ComfyUI's bypass rule)."""
    inputs = raw.get("inputs") or []
    for slot in (output_slot, *range(len(inputs))):
        entry = inputs[slot] if slot < len(inputs) else None
        if isinstance(entry, Mapping) and entry.get("type") == wanted_type:
            return entry.get("link")
    return None


def _parse_link(row: Any) -> UiLink:
    if isinstance(row, Mapping):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        fields = [row.get(key) for key in keys]
    elif isinstance(row, list) and len(row) >= 6:
        fields = row[:6]
    else:
        raise WorkflowError(f"malformed UI link entry: {str(row)[:80]}")
    link_id, origin_id, origin_slot, target_id, target_slot, link_type = fields
    try:
        return UiLink(
            int(link_id), str(origin_id), int(origin_slot), str(target_id), int(target_slot), str(link_type)
        )
    except (TypeError, ValueError):
        raise WorkflowError(f"malformed UI link entry: {str(row)[:80]}") from None
