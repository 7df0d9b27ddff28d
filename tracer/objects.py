"""Walking model objects: their named parts, dotted paths into them, and their tensors.

The parts of an object are, by kind: a diffusers pipeline's ``components``;
a dataclass's fields (the engine's ``DiffusionModel``, ``TextEncoders``…); a
tuple's or list's items (``"0"``, ``"1"``); a dict's string keys; a torch
module's child modules. Paths join part names with dots (``unet.conv_in``,
``encoders.1``). Only identity matters when searching: ``find_path`` never
compares values.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffsplit.tracer.recipe import join_path, split_path

#: How deep a path search descends through containers (torch modules are indexed in one go).
MAX_DEPTH = 8


def is_pipeline(value: Any) -> bool:
    """Whether ``value`` looks like a diffusers pipeline (a ``components`` dict, not a module)."""
    if isinstance(value, torch.nn.Module | type):
        return False
    components = getattr(type(value), "components", None)
    return isinstance(components, property) and hasattr(value, "config")


def describe(value: Any) -> str:
    """The type name of ``value``, as reports show it."""
    return type(value).__name__


def parts(value: Any) -> Iterator[tuple[str, Any]]:
    """The named parts of ``value`` one level down (see the module docstring); None parts skipped."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, torch.nn.Module):
        yield from value.named_children()
    elif is_pipeline(value):
        for name, component in value.components.items():
            if component is not None:
                yield name, component
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            part = getattr(value, item.name, None)
            if part is not None:
                yield item.name, part
    elif isinstance(value, tuple | list):
        for index, part in enumerate(value):
            if part is not None:
                yield str(index), part
    elif isinstance(value, Mapping):
        for key, part in value.items():
            if isinstance(key, str) and part is not None and "." not in key:
                yield key, part


_MISSING = object()


def get_path(value: Any, path: str) -> Any:
    """The part at ``path`` inside ``value``; raises LookupError.

    Only named parts are followed (see :func:`parts`: child modules, pipeline
    components, dataclass fields, mapping keys, sequence indices), never
    arbitrary attributes, and no segment may start with ``_``: a path that
    comes from a recipe can reach models, not the objects behind them.
    """
    current = value
    for segment in split_path(path):
        if not segment or segment.startswith("_"):
            raise LookupError(f"{path!r}: {segment!r} is not a part name")
        found = dict(parts(current)).get(segment, _MISSING)
        if found is _MISSING:
            raise LookupError(f"{path!r}: {describe(current)} has no part {segment!r}")
        current = found
    return current


def index_paths(root: Any) -> dict[int, str]:
    """``{id(part): path}`` for every part reachable from ``root`` (shortest path wins)."""
    found: dict[int, str] = {}
    pending: deque[tuple[Any, str, int]] = deque([(root, "", 0)])
    while pending:
        value, path, depth = pending.popleft()
        if id(value) in found:
            continue
        found[id(value)] = path
        if isinstance(value, torch.nn.Module):
            for name, module in value.named_modules():
                found.setdefault(id(module), join_path(path, name))
            continue
        if depth >= MAX_DEPTH:
            continue
        for name, part in parts(value):
            pending.append((part, join_path(path, name), depth + 1))
    return found


def find_path(root: Any, target: Any) -> str | None:
    """The path of ``target`` inside ``root`` (``""`` if it is ``root``), or None."""
    if root is target:
        return ""
    return index_paths(root).get(id(target))


def named_tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer reachable from ``value``, by path, each tensor once."""
    seen: set[int] = set()
    pending: deque[tuple[Any, str, int]] = deque([(value, "", 0)])
    visited: set[int] = set()
    while pending:
        current, path, depth = pending.popleft()
        if id(current) in visited:
            continue
        visited.add(id(current))
        if isinstance(current, torch.Tensor):
            if id(current) not in seen:
                seen.add(id(current))
                yield path, current
            continue
        if isinstance(current, torch.nn.Module):
            for name, tensor in (*current.named_parameters(), *current.named_buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield join_path(path, name), tensor
            continue
        if depth >= MAX_DEPTH:
            continue
        for name, part in parts(current):
            pending.append((part, join_path(path, name), depth + 1))


def config_of(value: Any) -> Mapping[str, Any] | None:
    """The ``config`` mapping of a diffusers scheduler-like object (not a module), else None."""
    if isinstance(value, torch.nn.Module) or is_pipeline(value):
        return None
    config = getattr(value, "config", None)
    return config if isinstance(config, Mapping) else None
