"""content_digest: a stable sha256 of nested data, tensor bytes included.

Used to skip re-sending what a peer already holds (conditioning, for one).
Two values have the same digest exactly when they would decode to equal
values: same structure, same types (tuple != list, torch tensor != numpy
array), same dtype, shape and bytes. Dict order does not matter (keys are
sorted); CUDA tensors are hashed from their CPU copy.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import msgpack
from diffsplit.transport.errors import UnsupportedType
from diffsplit.transport.tensors import UnsupportedTensor, to_bytes

_PREFIX = b"diffsplit-digest-v1\0"


def content_digest(obj: Any) -> str:
    """Hex sha256 over the canonical encoding of ``obj`` (the envelope's types only)."""
    h = hashlib.sha256(_PREFIX)
    try:
        _feed(h, obj)
    except RecursionError:
        raise UnsupportedType("value nests too deeply (or contains a cycle)") from None
    return h.hexdigest()


def _length(h: Any, tag: bytes, n: int) -> None:
    h.update(tag + n.to_bytes(8, "big"))


def _feed(h: Any, obj: Any) -> None:
    kind = type(obj)
    if obj is None or kind is bool:
        h.update(b"N" if obj is None else b"T" if obj else b"F")
    elif kind is int:
        h.update(b"i" + msgpack.packb(obj))
    elif kind is float:
        h.update(b"f" + struct.pack(">d", obj))
    elif kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        _length(h, b"s", len(data))
        h.update(data)
    elif kind is bytes:
        _length(h, b"b", len(obj))
        h.update(obj)
    elif kind is dict:
        _length(h, b"d", len(obj))
        for key in sorted(_keys(obj)):
            _feed(h, key)
            _feed(h, obj[key])
    elif kind is list or kind is tuple:
        _length(h, b"l" if kind is list else b"t", len(obj))
        for item in obj:
            _feed(h, item)
    else:
        _feed_other(h, obj)


def _keys(obj: dict[Any, Any]) -> list[str]:
    for key in obj:
        if type(key) is not str:
            raise UnsupportedType(f"cannot digest a dict key {key!r} of type {type(key).__name__}")
    return list(obj)


def base_value(obj: Any) -> Any:
    """A subclass of a supported type as its base (namedtuple -> tuple, IntEnum -> int, ...).

    Raises TypeError for anything else. The envelope and the digest both use it,
    so a value digests as it would be sent.
    """
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, tuple):
        return tuple(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    raise TypeError(f"a value of type {type(obj).__module__}.{type(obj).__qualname__}")


def _feed_other(h: Any, obj: Any) -> None:
    try:
        tensor = to_bytes(obj)
    except UnsupportedTensor as exc:
        raise UnsupportedType(f"cannot digest {exc}") from None
    if tensor is not None:
        h.update(b"x" + msgpack.packb([tensor.kind, tensor.dtype, list(tensor.shape)]))
        _length(h, b"", len(tensor.data))
        h.update(tensor.data)
        return
    try:
        value = base_value(obj)
    except TypeError as exc:
        raise UnsupportedType(f"cannot digest {exc}") from None
    _feed(h, value)
