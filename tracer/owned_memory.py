"""Weights that own normally allocated memory, so results depend on values only.

A tensor read from a ``.safetensors`` file lives where the file's bytes are
mapped: its address is the file's byte offset plus a page, so ``data_ptr() %
64`` is whatever the header length made it. On some CPUs the SIMD kernels give
results that depend on that alignment (measured: 1.5e-6 apart for equal
weights). Torch's own CPU allocator returns 64-byte aligned blocks; a tensor
moved into such a block computes the same everywhere.

:func:`owned_tensor` copies one tensor when it needs it (or always, with
``force``); :func:`own_weights` does it for every parameter and buffer of the
modules inside any loaded object (a module, a pipeline, a tuple of models, a
state dict), in place, keeping ``Parameter`` identity so tied weights stay tied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

#: The alignment torch's CPU allocator gives (``c10::gAlignment``).
ALIGNMENT = 64
#: How deep :func:`own_weights` looks into containers and pipeline components.
MAX_DEPTH = 6


def is_owned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be used as it is: not a CPU tensor, or one at a 64-byte aligned address.

    Empty and meta tensors count as owned (there is nothing to read).
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return True
    return tensor.data_ptr() % ALIGNMENT == 0


def owned_tensor(tensor: torch.Tensor, *, force: bool = False) -> torch.Tensor:
    """``tensor`` in a fresh, contiguous, allocator-owned block (``tensor`` itself when that is already so).

    ``force`` copies CPU tensors even when their address happens to be
    aligned: a tensor read from a file then no longer keeps the mapping alive.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return tensor
    if not force and is_owned(tensor) and tensor.is_contiguous():
        return tensor
    fresh = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="cpu")
    fresh.copy_(tensor)
    return fresh


def own_state(state: MutableMapping[str, Any], *, force: bool = False) -> int:
    """Replace every tensor value of ``state`` by its owned copy where needed; returns how many moved."""
    moved = 0
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor):
            fresh = owned_tensor(value, force=force)
            if fresh is not value:
                state[key] = fresh
                moved += 1
    return moved


def own_module(module: torch.nn.Module) -> int:
    """Move each parameter and buffer of ``module`` that is not owned into owned memory, in place.

    Parameters and buffers keep their identity (``tensor.data`` is swapped, the
    version counter untouched), so weights tied between two modules stay one
    object and the tracer's snapshots see no edit. Returns how many tensors moved.
    """
    moved = 0
    with torch.no_grad():
        for submodule in module.modules():
            for tensor in (*submodule._parameters.values(), *submodule._buffers.values()):
                if tensor is not None and not is_owned(tensor):
                    tensor.data = owned_tensor(tensor)
                    moved += 1
    return moved


def own_weights(value: Any) -> int:
    """Give every module inside ``value`` owned weights (see :func:`own_module`); returns tensors moved.

    Looks into modules, pipelines (their ``components``), mappings, lists,
    tuples and dataclass fields (the graph's model wrappers);
    a mutable mapping of tensors (a state dict) has its values replaced.
    """
    moved = 0
    seen: set[int] = set()
    for found in _loaded_parts(value, seen, MAX_DEPTH):
        if isinstance(found, torch.nn.Module):
            moved += own_module(found)
        else:
            moved += own_state(found)
    return moved


def _loaded_parts(value: Any, seen: set[int], depth: int) -> Iterator[Any]:
    if depth < 0 or id(value) in seen or value is None or isinstance(value, (str, bytes, int, float)):
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        yield value
        return
    if isinstance(value, Mapping):
        holds_tensors = any(isinstance(item, torch.Tensor) for item in value.values())
        if isinstance(value, MutableMapping) and holds_tensors:
            yield value
        for item in value.values():
            yield from _loaded_parts(item, seen, depth - 1)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _loaded_parts(item, seen, depth - 1)
        return
    components = getattr(value, "components", None)
    if isinstance(components, Mapping):
        yield from _loaded_parts(components, seen, depth - 1)
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _loaded_parts(getattr(value, field.name), seen, depth - 1)
