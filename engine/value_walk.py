"""One walker for nested values: visit every part of a value, or rebuild it with some parts replaced.

Node values nest tensors and models in plain dicts, lists and tuples
(LATENT, CONDITIONING) and in the engine's frozen dataclasses (MODEL, a
ControlNet hint inside a conditioning entry); wire values nest descriptors in
the same containers. :func:`iter_values` visits every part (bounded, for what
a peer sent); :func:`map_value` asks ``leaf``
about every value first; where it answers :data:`DESCEND`, containers are
walked. Containers are rebuilt only where something inside changed, and one
object met twice maps to one result, so identities the caller relies on (one
hint shared by the positive and negative conditioning) survive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final


class _Descend:
    def __repr__(self) -> str:
        return "DESCEND"


#: What ``leaf`` returns for a value it leaves to the walker (a container is walked, anything else kept).
DESCEND: Final = _Descend()

Leaf = Callable[[Any], Any]


def map_value(
    value: Any, leaf: Leaf, memo: dict[int, Any] | None = None, *, into_dataclasses: bool = False
) -> Any:
    """``value`` with each part for which ``leaf`` returns something other than DESCEND replaced by it.

    Walked: exact dicts, lists and tuples (not subclasses: library result classes keep their own
    type) and, with ``into_dataclasses``, dataclass instances (rebuilt with ``dataclasses.replace``).
    ``memo`` maps ``id`` of what was met to its result; pass one dict to share it across calls.
    """
    memo = {} if memo is None else memo
    key = id(value)
    if key in memo:
        return memo[key]
    result = leaf(value)
    if result is DESCEND:
        result = _walk(value, leaf, memo, into_dataclasses)
    memo[key] = result
    return result


def _walk(value: Any, leaf: Leaf, memo: dict[int, Any], into_dataclasses: bool) -> Any:
    if type(value) is dict:
        items = {name: map_value(item, leaf, memo, into_dataclasses=into_dataclasses)
                 for name, item in value.items()}
        changed = any(items[name] is not item for name, item in value.items())
        return items if changed else value
    if type(value) in (list, tuple):
        parts = [map_value(item, leaf, memo, into_dataclasses=into_dataclasses) for item in value]
        if not any(new is not old for new, old in zip(parts, value, strict=True)):
            return value
        return parts if isinstance(value, list) else tuple(parts)
    if into_dataclasses and dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [field.name for field in dataclasses.fields(value) if field.init]
        new = {name: map_value(getattr(value, name), leaf, memo, into_dataclasses=True) for name in fields}
        changed = {name: item for name, item in new.items() if item is not getattr(value, name)}
        return dataclasses.replace(value, **changed) if changed else value
    return value


def iter_values(
    value: Any,
    *,
    descend: Callable[[Any], bool] | None = None,
    into_dataclasses: bool = False,
    unique: bool = False,
    max_depth: int | None = None,
    max_values: int | None = None,
) -> Iterator[Any]:
    """``value`` and everything nested in its mappings, lists and tuples, depth first, parents first.

    With ``into_dataclasses``, dataclass instances' fields too. ``descend(item)`` False keeps an
    item's contents out of the walk (the item itself is still visited); ``unique`` visits an object
    met twice once; ``max_depth`` and ``max_values`` bound the walk of a value a peer sent. No
    recursion: a deeply nested value cannot exhaust the stack.
    """
    seen: set[int] = set()
    visited = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        if max_values is not None and visited >= max_values:
            return
        item, depth = stack.pop()
        if unique:
            if id(item) in seen:
                continue
            seen.add(id(item))
        visited += 1
        yield item
        if (max_depth is not None and depth >= max_depth) or (descend is not None and not descend(item)):
            continue
        children = _children(item, into_dataclasses)
        stack.extend((child, depth + 1) for child in reversed(children))


def _children(item: Any, into_dataclasses: bool) -> list[Any]:
    if isinstance(item, Mapping):
        return list(item.values())
    if isinstance(item, list | tuple):
        return list(item)
    if into_dataclasses and dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [getattr(item, field.name) for field in dataclasses.fields(item)]
    return []
