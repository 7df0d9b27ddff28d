"""The worker's errors: one structured type on the wire, the same typed exceptions at both ends.

A worker raises one of these, sends it as the final reply ``{"op": "error",
"error": {"kind": ..., "message": ..., <fields of the kind>}}`` (every text cut
to size, so an error reply always fits the limits), and the client decodes that
reply into an instance of the same class: ``except MissingModel`` works on the
client, with the file the worker lacks, and a :class:`NodeFailed` carries the
worker's traceback. A kind this side does not know decodes to :class:`WorkerError`
with the peer's kind kept. What a peer sends here is data: decoding never
raises, whatever it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, cast

from diffsplit.transport.errors import DiffsplitError
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS, clip

#: The op of an error reply.
ERROR_OP = "error"
#: In an error reply: the most items of a list (e.g. NotHeld digests), the longest other text field.
MAX_ERROR_ITEMS = 1024
MAX_ERROR_FIELD_CHARS = 1024
#: The longest kind name a decoded error keeps.
MAX_KIND_CHARS = 64


class WorkerError(DiffsplitError):
    """An error a worker reports for one request. ``kind`` names it on the wire."""

    kind: str = "WorkerError"
    _kinds: ClassVar[dict[str, type[WorkerError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        WorkerError._kinds.setdefault(cls.kind, cls)

    def __init__(self, message: str, *, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.message = message
        #: the worker's traceback text ("" when it sent none)
        self.remote_traceback = remote_traceback

    def fields(self) -> dict[str, object]:
        """What the kind adds to ``kind`` and ``message`` on the wire."""
        return {}

    @classmethod
    def _from_fields(cls, message: str, fields: Mapping[str, object]) -> WorkerError:
        """An instance from a decoded reply's fields (already cut to size)."""
        return cls(message)

    def to_reply(self) -> dict[str, object]:
        """The error as plain data for a structured reply, cut to the error limits."""
        data: dict[str, object] = {"kind": self.kind, "message": self.message, **self.fields()}
        if self.remote_traceback:
            data["traceback"] = self.remote_traceback
        return bounded_error(data)


class BadRequest(WorkerError):
    """The request is malformed or asks for something the worker will not do."""

    kind = "BadRequest"


class Overloaded(WorkerError):
    """The worker's queue is full; try again later or elsewhere."""

    kind = "Overloaded"


class Cancelled(WorkerError):
    """The client cancelled the request, fell silent, or its deadline passed."""

    kind = "Cancelled"


class MissingModel(WorkerError):
    """A recipe names a file the worker's store does not have."""

    kind = "MissingModel"

    def __init__(self, name: str, sha256: str, size: int | None = None, *,
                 message: str | None = None) -> None:
        self.name = name
        self.sha256 = sha256
        self.size = size
        default = f"model file {name!r} (sha256 {sha256[:12]}…) is not in the worker's store"
        super().__init__(message or default)

    def fields(self) -> dict[str, object]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.size}

    @classmethod
    def _from_fields(cls, message: str, fields: Mapping[str, object]) -> WorkerError:
        size = fields.get("bytes")
        return cls(_text(fields.get("name")), _text(fields.get("sha256")),
                   size if isinstance(size, int) and not isinstance(size, bool) else None, message=message)


class NotHeld(WorkerError):
    """The request refers to values by digest that this worker no longer holds."""

    kind = "NotHeld"

    def __init__(self, digests: list[str], *, message: str | None = None) -> None:
        self.digests = digests
        default = f"{len(digests)} value(s) sent by digest are not held here; send them again"
        super().__init__(message or default)

    def fields(self) -> dict[str, object]:
        return {"digests": self.digests}

    @classmethod
    def _from_fields(cls, message: str, fields: Mapping[str, object]) -> WorkerError:
        digests = fields.get("digests")
        return cls([item for item in digests if isinstance(item, str)] if isinstance(digests, list) else [],
                   message=message)


class NodeFailed(WorkerError):
    """The node raised on the worker; ``traceback_text`` is the worker's traceback."""

    kind = "NodeFailed"

    def __init__(self, message: str, traceback_text: str = "") -> None:
        super().__init__(message, remote_traceback=traceback_text)

    @property
    def traceback_text(self) -> str:
        """The worker's traceback (the same as ``remote_traceback``)."""
        return self.remote_traceback

    def to_reply(self) -> dict[str, object]:
        return bounded_error({"kind": self.kind, "message": self.message, "traceback": self.remote_traceback})

    @classmethod
    def _from_fields(cls, message: str, fields: Mapping[str, object]) -> WorkerError:
        return cls(message)


def error_reply(error: WorkerError) -> dict[str, object]:
    """The final reply that carries ``error``."""
    return {"op": ERROR_OP, "error": error.to_reply()}


def is_error_reply(reply: Mapping[str, Any]) -> bool:
    """Whether a final reply is a worker's structured error."""
    return reply.get("op") == ERROR_OP


def error_from_reply(reply: Mapping[str, Any]) -> WorkerError:
    """The typed error an error reply carries (any peer data: an unknown or broken one decodes too)."""
    raw = reply.get("error")
    data = bounded_error(raw) if isinstance(raw, Mapping) else {}
    kind = _text(data.get("kind")) or "WorkerError"
    message = _text(data.get("message")) or "(no message)"
    cls = WorkerError._kinds.get(kind, WorkerError)
    error = cls._from_fields(message, data)
    traceback_text = data.get("traceback")
    if isinstance(traceback_text, str):
        error.remote_traceback = traceback_text
    if cls is WorkerError:
        error.kind = clip(kind, MAX_KIND_CHARS)  # the peer's name for what went wrong, kept to show it
    return error


E = TypeVar("E", bound=DiffsplitError)


def with_context(error: WorkerError, context: type[E], message: str) -> E:
    """``error`` as an instance of both its own class and ``context`` (a client's error), with ``message``.

    ``except MissingModel`` and ``except RemoteNodeError`` both catch what a client raises for a
    worker's MissingModel; its fields and the worker's traceback stay on it.
    """
    key = (type(error), context)
    combined = _COMBINED.get(key)
    if combined is None:  # two threads may both make one: either serves
        combined = type(type(error).__name__, (context, type(error)), {"__module__": context.__module__})
        _COMBINED[key] = combined
    instance = cast(E, Exception.__new__(combined))
    instance.__dict__.update(error.__dict__)
    Exception.__init__(instance, message)
    instance.__cause__ = error
    return instance


#: (worker error class, client error class) → the class that is both
_COMBINED: dict[tuple[type[WorkerError], type[DiffsplitError]], type[Any]] = {}


def bounded_error(error: Mapping[Any, object]) -> dict[str, object]:
    """An error reply cut to size whatever the peer sent: it always fits the limits.

    ``message`` is cut to ``MAX_MESSAGE_CHARS``, ``traceback`` to ``MAX_TRACEBACK_CHARS``,
    other texts to ``MAX_ERROR_FIELD_CHARS`` and lists to ``MAX_ERROR_ITEMS``; keys are texts.
    """
    out: dict[str, object] = {}
    for key, value in list(error.items())[:MAX_ERROR_ITEMS]:
        name = clip(str(key), MAX_ERROR_FIELD_CHARS)
        if name == "message":
            out[name] = clip(str(value), MAX_MESSAGE_CHARS)
        elif name == "traceback":
            out[name] = clip(str(value), MAX_TRACEBACK_CHARS)
        else:
            out[name] = _bounded_field(value)
    return out


def _bounded_field(value: object) -> object:
    if isinstance(value, str):
        return clip(value, MAX_ERROR_FIELD_CHARS)
    if isinstance(value, list | tuple):
        return [_bounded_field(item) for item in value[:MAX_ERROR_ITEMS]]
    return value


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
