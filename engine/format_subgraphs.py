"""Subgraphs of the ComfyUI editor, flattened into one plain UI-format graph.

The editor saves a subgraph once, in ``definitions.subgraphs`` (its own
``nodes``, ``links``, ``inputs`` and ``outputs``), and places it as a node
whose ``type`` is the subgraph's id. Inside, links from the pseudo node
``-10`` (``inputNode``) carry the subgraph's inputs and links to ``-20``
(``outputNode``) its outputs. Subgraphs may nest.

:func:`flatten_subgraphs` returns a document without subgraph nodes, which the
UI converter reads as usual:

- every inner node gets the id ``"<outer id>:<inner id>"`` (nested:
  ``"5:3:2"``), as ComfyUI numbers them when it runs a subgraph;
- each subgraph input and output becomes a ``Reroute`` (``"5:in0"``,
  ``"5:out0"``), so links are followed through the boundary by the converter's
  ordinary rules, and an input fed by nothing leaves the inner widget value;
- a value the outer node holds for a promoted widget (``widgets_values`` for
  inputs marked ``widget``, or the ``proxyWidgets`` property of newer editors)
  becomes a ``PrimitiveNode`` feeding the right place;
- link ids are renumbered (each definition has its own id space).

A muted or bypassed subgraph node is kept as it is: the converter drops it
(bypass passes its inputs through by type), as the editor does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from diffsplit.engine.errors import WorkflowError

#: The ids of a subgraph's boundary pseudo nodes.
INPUT_NODE_ID = -10
OUTPUT_NODE_ID = -20
#: How deep subgraphs may nest.
MAX_DEPTH = 16
MODE_MUTED = 2
MODE_BYPASSED = 4

_LINK_KEYS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def subgraph_definitions(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The document's subgraph definitions by id (empty when it has none)."""
    definitions = document.get("definitions")
    entries = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise WorkflowError("'definitions.subgraphs' must be a list")
    found: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            raise WorkflowError(f"subgraph definition without an id: {str(entry)[:80]}")
        found[entry["id"]] = entry
    return found


def flatten_subgraphs(document: Mapping[str, Any]) -> Mapping[str, Any]:
    """``document`` with every active subgraph node replaced by its (flattened) contents."""
    definitions = subgraph_definitions(document)
    nodes = document.get("nodes") or []
    if not definitions or not any(isinstance(n, Mapping) and n.get("type") in definitions for n in nodes):
        return document
    flattener = _Flattener(definitions)
    flat_nodes, flat_links = flattener.level(nodes, document.get("links") or [], "", (), {}, 0)
    flat = {key: value for key, value in document.items() if key not in ("nodes", "links")}
    flat["nodes"] = flat_nodes
    flat["links"] = flat_links
    return flat


def _parse_link(row: Any) -> tuple[Any, ...]:
    if isinstance(row, Mapping):
        return tuple(row.get(key) for key in _LINK_KEYS)
    if isinstance(row, list) and len(row) >= 6:
        return tuple(row[:6])
    raise WorkflowError(f"malformed UI link entry: {str(row)[:80]}")


class _Flattener:
    def __init__(self, definitions: Mapping[str, Mapping[str, Any]]) -> None:
        self.definitions = definitions
        self._ids: Iterator[int] = itertools.count(1)

    def level(
        self,
        nodes: Sequence[Any],
        links: Sequence[Any],
        prefix: str,
        stack: tuple[str, ...],
        boundary: Mapping[int, int | None],
        output_count: int,
    ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        """Flatten one graph level.

        Inside a subgraph, ``boundary`` maps each input slot to the new link id
        feeding it (None: nothing), and ``output_count`` is how many outputs it declares.
        """
        if not isinstance(nodes, list) or not isinstance(links, list):
            raise WorkflowError(f"subgraph {stack[-1] if stack else ''!r}: 'nodes' and 'links' must be lists")
        parsed = [_parse_link(row) for row in links]
        new_ids = {row[0]: next(self._ids) for row in parsed}
        active = {
            str(raw["id"]): raw
            for raw in nodes
            if isinstance(raw, Mapping) and "id" in raw and raw.get("type") in self.definitions
            and raw.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)
        }
        out_nodes: list[dict[str, Any]] = []
        out_links: list[list[Any]] = []
        # boundary reroutes of this level (when it is a subgraph's inside)
        outputs_feed: dict[int, int] = {}
        for link_id, origin, origin_slot, target, target_slot, kind in parsed:
            new_origin, new_slot = self._origin(prefix, origin, origin_slot, active)
            if _is(target, OUTPUT_NODE_ID):
                outputs_feed[int(target_slot)] = new_ids[link_id]
                target, target_slot = f"{prefix}out{int(target_slot)}", 0
            elif str(target) in active:
                target, target_slot = f"{prefix}{target}:in{int(target_slot)}", 0
            else:
                target = f"{prefix}{target}"
            out_links.append([new_ids[link_id], new_origin, new_slot, target, target_slot, kind])
        if stack:
            for slot, link_id in boundary.items():
                out_nodes.append(_reroute(f"{prefix}in{slot}", link_id))
            for slot in range(output_count):
                out_nodes.append(_reroute(f"{prefix}out{slot}", outputs_feed.get(slot)))
        for raw in nodes:
            if not isinstance(raw, Mapping) or "id" not in raw:
                raise WorkflowError(f"UI node entry without an id and a type: {str(raw)[:80]}")
            node_id = str(raw["id"])
            if node_id in active:
                inner_nodes, inner_links = self._expand(raw, prefix, stack, new_ids)
                out_nodes.extend(inner_nodes)
                out_links.extend(inner_links)
            else:
                out_nodes.append(_renumbered(raw, f"{prefix}{node_id}", new_ids))
        return out_nodes, out_links

    def _origin(
        self, prefix: str, origin: Any, slot: Any, active: Mapping[str, Any]
    ) -> tuple[str, int]:
        if _is(origin, INPUT_NODE_ID):
            return f"{prefix}in{int(slot)}", 0
        if str(origin) in active:
            return f"{prefix}{origin}:out{int(slot)}", 0
        return f"{prefix}{origin}", int(slot)

    def _expand(
        self, raw: Mapping[str, Any], prefix: str, stack: tuple[str, ...], new_ids: Mapping[Any, int]
    ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        subgraph_id = str(raw["type"])
        node_id = f"{prefix}{raw['id']}"
        if subgraph_id in stack:
            raise WorkflowError(f"subgraph {subgraph_id!r} contains itself (through {' > '.join(stack)})")
        if len(stack) >= MAX_DEPTH:
            raise WorkflowError(f"subgraphs nest deeper than {MAX_DEPTH} levels at node {node_id}")
        definition = self.definitions[subgraph_id]
        declared = definition.get("inputs") or []
        declared_outputs = definition.get("outputs") or []
        if not isinstance(declared, list) or not isinstance(declared_outputs, list):
            raise WorkflowError(f"subgraph {subgraph_id!r}: 'inputs' and 'outputs' must be lists")
        inner_prefix = f"{node_id}:"
        extra_nodes: list[dict[str, Any]] = []
        extra_links: list[list[Any]] = []
        boundary: dict[int, int | None] = {}
        entries = [e for e in raw.get("inputs") or [] if isinstance(e, Mapping)]
        promoted = _promoted_values(raw, entries)
        for slot, spec in enumerate(declared):
            name = spec.get("name") if isinstance(spec, Mapping) else None
            entry = _entry_for(entries, name, slot)
            link = entry.get("link") if entry is not None else None
            if link is not None:
                boundary[slot] = new_ids.get(link)
                if boundary[slot] is None:
                    raise WorkflowError(f"refers to link {link}, which is not in 'links'", node_id=node_id,
                                        class_type=subgraph_id, input_name=str(name))
            elif name in promoted:
                primitive_id = f"{inner_prefix}in{slot}:value"
                link_id = next(self._ids)
                extra_nodes.append(_primitive(primitive_id, promoted[name], link_id))
                extra_links.append([link_id, primitive_id, 0, f"{inner_prefix}in{slot}", 0, "*"])
                boundary[slot] = link_id
            else:
                boundary[slot] = None
        inner_nodes, inner_links = self.level(
            definition.get("nodes") or [], definition.get("links") or [], inner_prefix,
            (*stack, subgraph_id), boundary, len(declared_outputs),
        )
        self._apply_proxy_widgets(raw, inner_prefix, inner_nodes, extra_nodes, extra_links)
        return [*extra_nodes, *inner_nodes], [*extra_links, *inner_links]

    def _apply_proxy_widgets(
        self, raw: Mapping[str, Any], inner_prefix: str, inner_nodes: list[dict[str, Any]],
        extra_nodes: list[dict[str, Any]], extra_links: list[list[Any]],
    ) -> None:
        """Newer editors show inner widgets on the subgraph node (``proxyWidgets``), values in order."""
        proxies = (raw.get("properties") or {}).get("proxyWidgets")
        values = raw.get("widgets_values")
        if not isinstance(proxies, list) or not isinstance(values, list):
            return
        by_id = {node["id"]: node for node in inner_nodes}
        for index, proxy in enumerate(proxies):
            if index >= len(values) or not isinstance(proxy, list) or len(proxy) != 2:
                continue
            target = by_id.get(f"{inner_prefix}{proxy[0]}")
            if target is None:
                continue
            widget = str(proxy[1])
            inputs = target.setdefault("inputs", [])
            entry = _entry_for([e for e in inputs if isinstance(e, Mapping)], widget, None)
            if entry is not None and entry.get("link") is not None:
                continue  # a link wins over the shown value
            primitive_id = f"{target['id']}:{widget}:value"
            link_id = next(self._ids)
            if entry is None:
                inputs.append({"name": widget, "type": "*", "widget": {"name": widget}, "link": link_id})
            else:
                entry["link"] = link_id
            extra_nodes.append(_primitive(primitive_id, values[index], link_id))
            extra_links.append([link_id, primitive_id, 0, target["id"], len(inputs) - 1, "*"])


def _is(node_id: Any, wanted: int) -> bool:
    try:
        return int(node_id) == wanted
    except (TypeError, ValueError):
        return False


def _entry_for(entries: Sequence[Mapping[str, Any]], name: Any, slot: int | None) -> Mapping[str, Any] | None:
    for entry in entries:
        widget = entry.get("widget")
        if entry.get("name") == name or (isinstance(widget, Mapping) and widget.get("name") == name):
            return entry
    if slot is not None and name is None and slot < len(entries):
        return entries[slot]
    return None


def _promoted_values(raw: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Values the subgraph node holds for its inputs shown as widgets (``widgets_values`` in order)."""
    values = raw.get("widgets_values")
    if isinstance(values, Mapping):
        return dict(values)
    if not isinstance(values, list) or isinstance((raw.get("properties") or {}).get("proxyWidgets"), list):
        return {}
    widget_names = [str(e.get("name")) for e in entries if isinstance(e.get("widget"), Mapping)]
    return dict(zip(widget_names, values, strict=False))


def _renumbered(raw: Mapping[str, Any], node_id: str, new_ids: Mapping[Any, int]) -> dict[str, Any]:
    node = dict(raw)
    node["id"] = node_id
    inputs = []
    for entry in raw.get("inputs") or []:
        if isinstance(entry, Mapping) and entry.get("link") is not None:
            if entry["link"] not in new_ids:
                raise WorkflowError(
                    f"refers to link {entry['link']}, which is not in 'links'", node_id=node_id,
                    class_type=str(raw.get("type")), input_name=str(entry.get("name")),
                )
            entry = {**entry, "link": new_ids[entry["link"]]}
        inputs.append(entry)
    node["inputs"] = inputs
    node["outputs"] = [
        {**entry, "links": [new_ids[i] for i in entry.get("links") or [] if i in new_ids]}
        if isinstance(entry, Mapping) else entry
        for entry in raw.get("outputs") or []
    ]
    return node


def _reroute(node_id: str, link_id: int | None) -> dict[str, Any]:
    return {"id": node_id, "type": "Reroute", "mode": 0,
            "inputs": [{"name": "", "type": "*", "link": link_id}],
            "outputs": [{"name": "", "type": "*", "links": []}], "properties": {}}


def _primitive(node_id: str, value: Any, link_id: int) -> dict[str, Any]:
    return {"id": node_id, "type": "PrimitiveNode", "mode": 0, "inputs": [],
            "outputs": [{"name": "value", "type": "*", "links": [link_id]}],
            "widgets_values": [value, "fixed"], "properties": {}}
