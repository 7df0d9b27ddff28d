"""Put embedding vectors in place of token embeddings for one encoder call, thread-safely.

ComfyUI encodes a prompt with embeddings by building the token-embedding
sequence itself and splicing the vectors in. transformers' CLIP text models
take only ``input_ids``, so the vectors go in through a forward hook on the
encoder's input-embedding module: the prompt's vector slots carry a placeholder
id, and while :func:`injected_vectors` is active (in this thread or task only:
a ``ContextVar``, as transformers' own output capture does) the hook overwrites
those rows of the embedding output with the vectors, cast to its dtype. The
position embeddings are added afterwards, as for any token, so the result is
exactly that of a vocabulary extended by the vectors.

The hook is installed once per module (under a lock) and does nothing outside
an active injection, so calls without embeddings compute exactly as before and
concurrent calls on a shared encoder do not see each other's vectors. The
module's weights and state dict are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class _Injection:
    module: torch.nn.Module
    rows: torch.Tensor
    positions: torch.Tensor
    vectors: torch.Tensor


_ACTIVE: ContextVar[_Injection | None] = ContextVar("diffsplit_injected_vectors", default=None)
_INSTALL_LOCK = threading.Lock()

#: One slot to fill: (batch row, token position, vector [width]).
VectorSlot = tuple[int, int, torch.Tensor]


def _replace_rows(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    injection = _ACTIVE.get()
    if injection is None or injection.module is not module:
        return None
    patched = output.clone()
    vectors = injection.vectors.to(device=output.device, dtype=output.dtype)
    patched[injection.rows.to(output.device), injection.positions.to(output.device)] = vectors
    return patched


def _ensure_hook(module: torch.nn.Module) -> None:
    with _INSTALL_LOCK:
        if not any(hook is _replace_rows for hook in module._forward_hooks.values()):
            module.register_forward_hook(_replace_rows)


def input_embedding_module(encoder: torch.nn.Module) -> torch.nn.Module:
    """The token-embedding module of a transformers text encoder."""
    module = encoder.get_input_embeddings()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{type(encoder).__name__} has no input-embedding module")
    return module


@contextmanager
def injected_vectors(encoder: torch.nn.Module, slots: Sequence[VectorSlot]) -> Iterator[None]:
    """While active, ``encoder``'s token embeddings at ``slots`` are the given vectors (none: no effect)."""
    if not slots:
        yield
        return
    module = input_embedding_module(encoder)
    _ensure_hook(module)
    injection = _Injection(
        module=module,
        rows=torch.tensor([row for row, _, _ in slots], dtype=torch.long),
        positions=torch.tensor([position for _, position, _ in slots], dtype=torch.long),
        vectors=torch.stack([vector for _, _, vector in slots]),
    )
    token = _ACTIVE.set(injection)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
