"""Errors of the worker side; each maps to a structured reply on the wire.

They are the shared types of :mod:`diffsplit.transport.worker_errors`: a client
decodes a reply into the same class the worker raised.
"""

from __future__ import annotations

from diffsplit.transport.worker_errors import (
    BadRequest,
    Cancelled,
    MissingModel,
    NodeFailed,
    NotHeld,
    Overloaded,
    WorkerError,
)

#: The base of worker-side errors (the shared :class:`WorkerError`).
RemoteError = WorkerError

__all__ = ["BadRequest", "Cancelled", "MissingModel", "NodeFailed", "NotHeld", "Overloaded", "RemoteError"]
