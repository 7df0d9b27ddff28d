"""Bytes of node inputs and outputs as offloading would send them, without a worker.

Inputs go through the same conversion the remote runner uses
(:func:`diffsplit.engine.wire_values.to_wire`) and the envelope codec's
:func:`~diffsplit.transport.envelope.describe`, so the numbers are the wire's:
an all-zero latent travels as its shape, models as recipes, tensors as frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import msgpack
import torch
from diffsplit.engine.graph import Link, Node
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.types import MODEL_TYPES
from diffsplit.engine.value_walk import iter_values
from diffsplit.engine.wire_values import (
    MODEL,
    ZEROS,
    RecipeOf,
    WireValueError,
    is_model_value,
    to_wire,
)
from diffsplit.profiles.model import Category, InputMeasure
from diffsplit.transport.digest import content_digest
from diffsplit.transport.envelope import describe
from diffsplit.transport.errors import DiffsplitError
from diffsplit.transport.worker_ops import NodeResult, RunNode

_EMPTY_REQUEST_BYTES = describe({"v": None}).wire_bytes


@dataclass(frozen=True)
class RequestSize:
    """The inputs of one node as a request would carry them, or why they cannot travel."""

    inputs: tuple[InputMeasure, ...]
    request_bytes: int
    problem: str | None = None


def category_of(value: Any, declared_type: str) -> Category:
    """``model`` for model objects, ``intermediate`` for anything holding tensors, else ``normal``."""
    if declared_type in MODEL_TYPES or is_model_value(value):
        return "model"
    return "intermediate" if any(True for _ in tensors_in(value)) else "normal"


def tensors_in(value: Any):
    """Every tensor inside a node value (dicts, lists, tuples, control hints), depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)
    elif is_dataclass(value) and not isinstance(value, type) and not is_model_value(value):
        for item in fields(value):
            yield from tensors_in(getattr(value, item.name))


def tensor_bytes(value: Any) -> int:
    """Raw bytes of the tensors inside a value (each distinct tensor counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors_in(value):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def request_size(
    node: Node, node_class: NodeClass, inputs: Mapping[str, Any], recipe_of: RecipeOf
) -> RequestSize:
    """What sending ``node`` with these resolved inputs would put on the wire."""
    measures: list[InputMeasure] = []
    wire_inputs: dict[str, Any] = {}
    problem = None
    for name, value in inputs.items():
        spec = node_class.input(name)
        declared = spec.type if spec is not None else type(value).__name__
        category = category_of(value, declared)
        where = f"input '{name}'"
        try:
            wire = to_wire(value, recipe_of, where=where)
        except WireValueError as exc:
            problem = problem or str(exc)
            wire = None
        wire_inputs[name] = wire
        link = node.inputs.get(name)
        measures.append(InputMeasure(
            name=name, type=declared, category=category,
            source=link.node_id if isinstance(link, Link) else None,
            payload_bytes=_payload_bytes(value, wire, category),
            wire_bytes=_wire_bytes(wire),
            zeros=any(isinstance(item, dict) and ZEROS in item for item in iter_values(wire)),
            digest=_digest(wire) if declared == "CONDITIONING" and wire is not None else None,
        ))
    header = RunNode(node_id=node.id, class_type=node.class_type, inputs=wire_inputs).header()
    return RequestSize(tuple(measures), _wire_bytes(header, baseline=0), problem)


def reply_size(outputs: Sequence[Any]) -> tuple[int, str | None]:
    """Wire bytes of a reply carrying ``outputs``, or (0, why) when an output cannot travel back."""
    wire: list[Any] = []
    for index, value in enumerate(outputs):
        model = _model_inside(value)
        if model is not None:
            return 0, f"output {index} holds a model ({model}); models never travel back from a worker"
        try:
            wire.append(to_wire(value, _no_recipe, where=f"output {index}"))
        except WireValueError as exc:
            return 0, str(exc)
    return _wire_bytes(NodeResult(outputs=tuple(wire)).header(), baseline=0), None


def _no_recipe(value: Any) -> None:
    return None


def _model_inside(value: Any) -> str | None:
    """The class name of the first model object inside a value, or None."""
    if is_model_value(value):
        return type(value).__name__
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    elif is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, item.name) for item in fields(value)]
    else:
        return None
    for item in items:
        found = _model_inside(item)
        if found is not None:
            return found
    return None



def _payload_bytes(value: Any, wire: Any, category: Category) -> int:
    if category == "model":
        recipe = wire.get(MODEL) if isinstance(wire, dict) else None
        return len(json.dumps(recipe, sort_keys=True, separators=(",", ":"))) if recipe is not None else 0
    if category == "intermediate":
        return tensor_bytes(value)
    try:
        return len(msgpack.packb(wire, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return _wire_bytes(wire)


def _wire_bytes(value: Any, *, baseline: int = _EMPTY_REQUEST_BYTES) -> int:
    """Encoded bytes of ``value`` inside a message, beyond an empty message."""
    message = value if baseline == 0 else {"v": value}
    try:
        return max(0, describe(message).wire_bytes - baseline)
    except DiffsplitError:
        return 0


def _digest(wire: Any) -> str | None:
    try:
        return content_digest(wire)
    except DiffsplitError:
        return None
