"""Errors of the worker side; each maps to a structured reply on the wire."""

from __future__ import annotations

from diffsplit.transport.errors import DiffsplitError


class RemoteError(DiffsplitError):
    """Base class of worker-side errors. ``kind`` is the structured reply's name."""

    kind = "RemoteError"

    def to_reply(self) -> dict[str, object]:
        """The error as plain data for a structured reply."""
        return {"kind": self.kind, "message": str(self)}


class BadRequest(RemoteError):
    """The request is malformed or asks for something the worker will not do."""

    kind = "BadRequest"


class Overloaded(RemoteError):
    """The worker's queue is full; try again later or elsewhere."""

    kind = "Overloaded"


class MissingModel(RemoteError):
    """A recipe names a file the worker's store does not have."""

    kind = "MissingModel"

    def __init__(self, name: str, sha256: str, size: int | None = None) -> None:
        self.name = name
        self.sha256 = sha256
        self.size = size
        super().__init__(f"model file {name!r} (sha256 {sha256[:12]}…) is not in the worker's store")

    def to_reply(self) -> dict[str, object]:
        return {"kind": self.kind, "message": str(self), "name": self.name, "sha256": self.sha256,
                "bytes": self.size}


class NodeFailed(RemoteError):
    """The node raised on the worker; ``traceback`` is the worker's text."""

    kind = "NodeFailed"

    def __init__(self, message: str, traceback_text: str = "") -> None:
        self.traceback_text = traceback_text
        super().__init__(message)

    def to_reply(self) -> dict[str, object]:
        return {"kind": self.kind, "message": str(self), "traceback": self.traceback_text}
