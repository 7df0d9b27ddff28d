"""ComfyUI's API ("prompt") format: ``{"id": {"class_type", "inputs", "_meta"}}``.

An input value that is a two-element list ``[source_id, output_index]`` is a
link (ComfyUI's own rule); anything else is a literal. ``_meta`` carries the
``title`` and diffsplit's ``remote`` label (``"tcp://gpu:5555"``), which become
``Node.meta``. The ``{"prompt": {...}}`` wrapper that the ComfyUI server
accepts is unwrapped; its ``extra_data.extra_pnginfo.workflow`` (the UI form),
if present, is kept as ``Workflow.extra["workflow"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Link, Node, Workflow


def is_api_format(document: Any) -> bool:
    """Whether ``document`` looks like an API-format workflow (or its ``prompt`` wrapper)."""
    if not isinstance(document, Mapping):
        return False
    if isinstance(document.get("prompt"), Mapping):
        return True
    entries = list(document.values())
    all_objects = all(isinstance(entry, Mapping) for entry in entries)
    return all_objects and any("class_type" in entry for entry in entries)


def parse_api_format(document: Mapping[str, Any]) -> Workflow:
    """The workflow described by an API-format document."""
    extra: dict[str, Any] = {}
    prompt: Any = document
    if isinstance(document.get("prompt"), Mapping):
        prompt = document["prompt"]
        extra_data = document.get("extra_data")
        pnginfo = extra_data.get("extra_pnginfo") if isinstance(extra_data, Mapping) else None
        if isinstance(pnginfo, Mapping) and isinstance(pnginfo.get("workflow"), Mapping):
            extra["workflow"] = pnginfo["workflow"]
    nodes = [_parse_node(str(node_id), entry) for node_id, entry in prompt.items()]
    return Workflow.of(*nodes, source_format="api", extra=extra)


def _parse_node(node_id: str, entry: Any) -> Node:
    if not isinstance(entry, Mapping):
        raise WorkflowError(f"API node entry must be an object, got {type(entry).__name__}", node_id=node_id)
    class_type = entry.get("class_type")
    if not isinstance(class_type, str) or not class_type:
        raise WorkflowError("API node has no class_type", node_id=node_id)
    raw_inputs = entry.get("inputs") or {}
    if not isinstance(raw_inputs, Mapping):
        raise WorkflowError("'inputs' must be an object", node_id=node_id, class_type=class_type)
    inputs = {str(name): _parse_value(value) for name, value in raw_inputs.items()}
    raw_meta = entry.get("_meta") or {}
    if not isinstance(raw_meta, Mapping):
        raise WorkflowError("'_meta' must be an object", node_id=node_id, class_type=class_type)
    return Node(id=node_id, class_type=class_type, inputs=inputs, meta=dict(raw_meta))


def _parse_value(value: Any) -> Any:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str | int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    ):
        return Link(node_id=str(value[0]), output_index=value[1])
    return value


def save_api_format(workflow: Workflow) -> dict[str, Any]:
    """The workflow as an API-format document (JSON-ready; links as ``[id, index]``)."""
    document: dict[str, Any] = {}
    for node_id, node in workflow.nodes.items():
        inputs = {
            name: [value.node_id, value.output_index] if isinstance(value, Link) else _plain(value)
            for name, value in node.inputs.items()
        }
        entry: dict[str, Any] = {"inputs": inputs, "class_type": node.class_type}
        if node.meta:
            entry["_meta"] = {key: _plain(value) for key, value in node.meta.items()}
        document[node_id] = entry
    return document


def _plain(value: Any) -> Any:
    """Tuples become lists and mappings dicts, so ``json.dumps`` accepts the value."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
