"""msgpack with two ext types: the header's body and tensor table, both ways.

Internal to the envelope. Encoding turns the caller's data into msgpack-native
values (a tuple becomes an array led by the tuple marker ext, a tensor an ext
holding its index in the table) and collects the tensors. Decoding hooks
resolve those two ext types and refuse every other one, Timestamp included,
and any map key that is not a str. ``validate_table`` checks every descriptor
against the limits and its bytes before anything is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from diffsplit.transport.digest import base_value
from diffsplit.transport.errors import MalformedMessage, MessageTooLarge
from diffsplit.transport.limits import Limits
from diffsplit.transport.shown import clip, shown
from diffsplit.transport.tensors import (
    ITEMSIZE,
    KIND_NUMPY_SCALAR,
    KIND_TORCH,
    KINDS,
    NUMPY_DTYPES,
    UnsupportedTensor,
    nbytes,
    to_bytes,
)

_EXT_TUPLE = 1
_EXT_TENSOR = 2
_TUPLE_EXT = msgpack.ExtType(_EXT_TUPLE, b"")
_TUPLE_MARK = object()  # what the tuple ext decodes to, before list_hook folds it
_SCALARS = frozenset({str, int, float, bool, bytes})


@dataclass(frozen=True)
class Descriptor:
    kind: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    in_frame: bool


class Unsupported(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []  # innermost first

    def message(self) -> str:
        where = "header" + "".join(reversed(self.path))
        return f"cannot encode {self.what} at {where}"


class Encoder:
    def __init__(self, inline_threshold: int) -> None:
        self.inline_threshold = inline_threshold
        self.table: list[list[Any]] = []
        self.frames: list[memoryview] = []
        self._refs: dict[int, msgpack.ExtType] = {}

    def convert(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _SCALARS or obj is None:
            return obj
        if kind is dict:
            return self._dict(obj)
        if kind is list:
            return self._items(obj)
        if kind is tuple:
            return [_TUPLE_EXT, *self._items(obj)]
        ref = self._refs.get(id(obj))
        if ref is not None:
            return ref
        try:
            tensor = to_bytes(obj)
        except UnsupportedTensor as exc:
            raise Unsupported(str(exc)) from None
        if tensor is None:
            try:
                return self.convert(base_value(obj))
            except TypeError as exc:
                raise Unsupported(str(exc)) from None
        if len(tensor.data) >= self.inline_threshold and len(tensor.data) > 0:
            self.frames.append(tensor.data)
            loc: int | bytes = len(self.frames) - 1
        else:
            loc = tensor.data.tobytes()
        self.table.append([tensor.kind, tensor.dtype, list(tensor.shape), loc])
        ref = msgpack.ExtType(_EXT_TENSOR, (len(self.table) - 1).to_bytes(4, "big"))
        self._refs[id(obj)] = ref
        return ref

    def _dict(self, obj: dict[Any, Any]) -> dict[str, Any]:
        out = {}
        for key, value in obj.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    kind = type(key).__name__
                    raise Unsupported(f"a dict key {shown(key)} of type {kind} (keys must be str)")
                key = str.__str__(key)
            try:
                out[key] = self.convert(value)
            except Unsupported as exc:
                exc.path.append(f"[{shown(key)}]")
                raise
        return out

    def _items(self, obj: Sequence[Any]) -> list[Any]:
        out = []
        for i, value in enumerate(obj):
            try:
                out.append(self.convert(value))
            except Unsupported as exc:
                exc.path.append(f"[{i}]")
                raise
        return out


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


#: Header bytes per array or map a header may hold (see ``Decoder.count``).
HEADER_BYTES_PER_CONTAINER = 32


def container_budget(limits: Limits) -> int:
    """How many arrays and maps one header may hold: one per 32 bytes of ``Limits.max_header_bytes``."""
    return max(limits.max_header_bytes // HEADER_BYTES_PER_CONTAINER, 1024)


class Decoder:
    """msgpack hooks: resolve tensor refs and tuple markers, refuse everything else.

    An empty array costs a byte on the wire and ~60 bytes and a hook call here,
    so the arrays and maps of one header are counted (``make_unpacker`` sets
    the budget): a header packed with millions of them is refused early
    instead of holding the I/O thread for seconds and hundreds of MB.
    """

    def __init__(self) -> None:
        self.objects: list[Any] | None = None  # set once the table is validated
        self.used: set[int] = set()
        self.budget: int | None = None  # arrays and maps allowed; None: no limit (make_unpacker sets one)
        self._counted = 0

    def count(self) -> None:
        """One more array or map; MessageTooLarge past the budget."""
        self._counted += 1
        if self.budget is not None and self._counted > self.budget:
            raise MessageTooLarge(
                f"the header holds more than {self.budget} arrays and maps (one per "
                f"{HEADER_BYTES_PER_CONTAINER} bytes of Limits.max_header_bytes)"
            )

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE and not data:
            return _TUPLE_MARK
        if code == _EXT_TENSOR and self.objects is not None and len(data) == 4:
            index = int.from_bytes(data, "big")
            if index >= len(self.objects):
                raise MalformedMessage(f"reference to tensor {index}; the table has {len(self.objects)}")
            self.used.add(index)
            return self.objects[index]
        raise MalformedMessage(f"unknown msgpack extension type {code} ({len(data)} bytes)")

    def list_hook(self, items: list[Any]) -> Any:
        self.count()
        for i, value in enumerate(items):
            if (value is _TUPLE_MARK and i > 0) or type(value) is msgpack.Timestamp:
                raise MalformedMessage("misplaced tuple marker or timestamp in an array")
        if items and items[0] is _TUPLE_MARK:
            return tuple(items[1:])
        return items

    def object_hook(self, obj: dict[Any, Any]) -> dict[str, Any]:
        self.count()
        for key, value in obj.items():
            if type(key) is not str:
                raise MalformedMessage(f"map key of type {type(key).__name__} (keys must be str)")
            if value is _TUPLE_MARK or type(value) is msgpack.Timestamp:
                raise MalformedMessage(f"tuple marker or timestamp as the value of {shown(key)}")
        return obj


def make_unpacker(header: memoryview, limits: Limits, decoder: Decoder) -> msgpack.Unpacker:
    """An unpacker over ``header`` with ``decoder``'s hooks, its container budget set from ``limits``."""
    decoder.budget = container_budget(limits)
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=max(limits.max_header_bytes, 1),
        ext_hook=decoder.ext_hook,
        list_hook=decoder.list_hook,
        object_hook=decoder.object_hook,
    )
    unpacker.feed(header)
    return unpacker


def unpack_next(unpacker: msgpack.Unpacker, what: str) -> Any:
    try:
        return unpacker.unpack()
    except (ValueError, msgpack.UnpackException) as exc:
        reason = f"{type(exc).__name__}: {clip(str(exc), 200)}"
        raise MalformedMessage(f"{what} is not valid msgpack: {reason}") from None


#: A hard cap on a tensor's element span (see ``_check_shape``), whatever the limits say.
_MAX_SPAN_BYTES = 1 << 48


def _check_shape(i: int, kind: int, dtype: str, shape: Any, limits: Limits) -> tuple[int, ...]:
    """The shape as a tuple that torch and numpy can allocate, else MalformedMessage/MessageTooLarge.

    Every dim is an int >= 0, and the tensor's *span* (its bytes with each 0 dim
    counted as 1) fits ``limits.max_total_bytes``: for a non-empty tensor that
    is its size; for an empty one it keeps every stride and numpy's size check
    in range (``[2**64-1, 0]`` holds 0 bytes but no allocator takes it).
    """
    if type(shape) is not list:
        raise MalformedMessage(f"tensor {i}: shape {shown(shape)} is not a list of non-negative ints")
    if len(shape) > limits.max_tensor_dims:
        raise MessageTooLarge(
            f"tensor {i}: {len(shape)} dims exceed Limits.max_tensor_dims={limits.max_tensor_dims}"
        )
    if any(type(d) is not int or d < 0 for d in shape):
        raise MalformedMessage(f"tensor {i}: shape {shown(shape)} is not a list of non-negative ints")
    if kind == KIND_NUMPY_SCALAR and shape:
        raise MalformedMessage(f"tensor {i}: a numpy scalar with shape {shown(shape)}")
    span = ITEMSIZE[dtype]
    for d in shape:
        span *= max(d, 1)
    if span > min(limits.max_total_bytes, _MAX_SPAN_BYTES):
        raise MessageTooLarge(
            f"tensor {i}: shape {shown(shape)} of {dtype} spans {span} bytes (counting 0 dims as 1), "
            f"over Limits.max_total_bytes={limits.max_total_bytes}"
        )
    return tuple(shape)


def validate_table(table: Any, frames: list[memoryview], limits: Limits) -> list[Descriptor]:
    """Check every descriptor against the limits and its bytes; allocates nothing.

    A descriptor that passes can be built by ``tensors.from_bytes`` without error.
    """
    if type(table) is not list:
        raise MalformedMessage("the tensor table is not an array")
    used = [False] * len(frames)
    declared = 0
    out = []
    for i, desc in enumerate(table):
        if type(desc) is not list or len(desc) != 4:
            raise MalformedMessage(f"tensor {i}: descriptor is not [kind, dtype, shape, loc]")
        kind, dtype, shape, loc = desc
        if type(kind) is not int or kind not in KINDS:
            raise MalformedMessage(f"tensor {i}: unknown kind {shown(kind)}")
        allowed = ITEMSIZE if kind == KIND_TORCH else NUMPY_DTYPES
        if type(dtype) is not str or dtype not in allowed:
            raise MalformedMessage(f"tensor {i}: unknown dtype {shown(dtype)}")
        dims = _check_shape(i, kind, dtype, shape, limits)
        size = nbytes(dtype, dims)
        declared += size
        if declared > limits.max_total_bytes:
            raise MessageTooLarge(
                f"tensor {i} ({dtype}{list(dims)}, {size} bytes) brings the declared total to {declared} "
                f"bytes, over Limits.max_total_bytes={limits.max_total_bytes}"
            )
        if type(loc) is int:
            if not 0 <= loc < len(frames) or used[loc]:
                raise MalformedMessage(f"tensor {i}: frame {shown(loc)} does not exist or is used twice")
            used[loc] = True
            data = frames[loc]
        elif type(loc) is bytes:
            data = memoryview(loc)
        else:
            raise MalformedMessage(f"tensor {i}: location is neither a frame index nor bytes")
        if len(data) != size:
            raise MalformedMessage(f"tensor {i}: {dtype}{list(dims)} needs {size} bytes, got {len(data)}")
        if dtype == "bool" and size and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
            raise MalformedMessage(f"tensor {i}: bool tensor holds bytes other than 0 and 1")
        out.append(Descriptor(kind, dtype, dims, data, type(loc) is int))
    if not all(used):
        unused = [i for i, u in enumerate(used) if not u]
        raise MalformedMessage(f"frames {shown(unused)} are not referenced")
    return out
