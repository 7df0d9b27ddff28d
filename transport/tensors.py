"""Tensors and arrays as raw bytes: the dtype table, zero-copy views, rebuilding.

The wire carries a tensor as (kind, dtype name, shape, C-order bytes in the
host's byte order — little-endian on every platform diffsplit targets).
bfloat16 has no numpy twin, so every tensor is viewed as flat ``uint8`` to
reach its bytes: the dtype travels as a tag, never as a numpy type.

torch is never imported here for encoding: if the sender has not imported it,
no tensor can exist. Decoding a torch tensor imports it on first need.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

KIND_TORCH = 0
KIND_NUMPY = 1
KIND_NUMPY_SCALAR = 2
KINDS = (KIND_TORCH, KIND_NUMPY, KIND_NUMPY_SCALAR)

#: Every dtype that may travel, with its size in bytes.
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}
#: numpy cannot hold bfloat16: such arrays exist only as torch tensors.
NUMPY_DTYPES = frozenset(ITEMSIZE) - {"bfloat16"}


@dataclass(frozen=True)
class TensorBytes:
    """A tensor or array seen as flat bytes, ready for the wire.

    ``data`` is a 1-D ``uint8`` memoryview that shares memory with the source
    whenever the source was a contiguous CPU tensor/array in native byte order
    (its ``obj`` keeps the source alive).
    """

    kind: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview


class UnsupportedTensor(ValueError):
    """A tensor that cannot travel (sparse, meta, quantized, an exotic dtype)."""


def torch_if_loaded() -> ModuleType | None:
    """The torch module if this process imported it already, else None."""
    return sys.modules.get("torch")


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Exact byte count of a C-contiguous tensor (Python ints: no overflow)."""
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def to_bytes(obj: Any) -> TensorBytes | None:
    """View a torch tensor, numpy array or numpy scalar as bytes; None for anything else."""
    torch = torch_if_loaded()
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_bytes(torch, obj)
    if isinstance(obj, np.ndarray):
        return _numpy_bytes(obj, KIND_NUMPY)
    if isinstance(obj, np.generic):
        return _numpy_bytes(np.asarray(obj), KIND_NUMPY_SCALAR)
    return None


def _torch_bytes(torch: ModuleType, t: Any) -> TensorBytes:
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise UnsupportedTensor(f"tensor with layout {t.layout} on {t.device} (only dense tensors travel)")
    name = str(t.dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise UnsupportedTensor(f"tensor dtype {t.dtype}")
    t = t.detach().resolve_neg()  # a lazy negation bit would block the uint8 view below
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # reshape(-1) of a contiguous tensor is a view; a 1-D view as uint8 works for
    # every dtype (bfloat16 included) and for 0-dim tensors. numpy() shares memory
    # and the array's base keeps the tensor alive.
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return TensorBytes(KIND_TORCH, name, tuple(t.shape), memoryview(flat))


def _numpy_bytes(a: np.ndarray, kind: int) -> TensorBytes:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    name = a.dtype.name
    if name not in NUMPY_DTYPES:
        raise UnsupportedTensor(f"numpy dtype {a.dtype}")
    if not a.flags.c_contiguous:
        a = np.array(a, order="C")  # not ascontiguousarray: that turns 0-dim into 1-dim
    return TensorBytes(kind, name, tuple(a.shape), a.reshape(-1).view(np.uint8).data)


def _address(data: memoryview) -> int:
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)


#: The alignment torch's CPU allocator gives. A tensor at another address can
#: compute different bits on some CPUs (alignment-dependent SIMD paths), so
#: received data that does not sit at such an address is copied.
ALIGNMENT = 64


def needs_copy(data: memoryview, dtype: str) -> bool:
    """True when ``data`` cannot back a tensor directly: read-only or not 64-byte aligned."""
    return data.readonly or _address(data) % ALIGNMENT != 0


def _aligned_buffer(data: memoryview) -> memoryview:
    """A writable copy of ``data`` that starts at a 64-byte aligned address."""
    raw = np.empty(len(data) + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    block = raw[start : start + len(data)]
    block[:] = np.frombuffer(data, dtype=np.uint8)
    return block.data


def from_bytes(kind: int, dtype: str, shape: tuple[int, ...], data: memoryview) -> Any:
    """Rebuild a tensor/array/scalar from bytes whose length the caller has checked.

    Zero copy when ``data`` is writable and 64-byte aligned (a received
    ``zmq.Frame`` usually is: the result holds a reference to the frame, so it
    stays valid after the socket lets go). Read-only or misaligned buffers
    (``bytes``, inline payloads, frames at odd addresses) are copied once into
    a fresh aligned block, so a result never depends on where its bytes
    arrived. Results are always writable, C-contiguous and own (or keep alive)
    their memory.
    """
    if kind == KIND_TORCH:
        torch = importlib.import_module("torch")
        torch_dtype = getattr(torch, dtype)
        if len(data) == 0:
            return torch.empty(shape, dtype=torch_dtype)
        if needs_copy(data, dtype):
            fresh = torch.empty(shape, dtype=torch_dtype)
            fresh.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
            return fresh
        return torch.frombuffer(data, dtype=torch_dtype).reshape(shape)
    np_dtype = np.dtype(dtype)
    if len(data) == 0:
        return np.empty(shape, dtype=np_dtype)
    if needs_copy(data, dtype):
        data = _aligned_buffer(data)
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return array[()] if kind == KIND_NUMPY_SCALAR else array
