"""Errors of the engine: each names the node, its class and the input at fault."""

from __future__ import annotations

from diffsplit.transport.errors import DiffsplitError


class EngineError(DiffsplitError):
    """Base class of engine errors."""


class WorkflowError(EngineError):
    """A workflow cannot be parsed or validated.

    The message always names what is wrong; ``node_id``, ``class_type`` and
    ``input_name`` say where, when known.
    """

    def __init__(
        self,
        reason: str,
        *,
        node_id: str | None = None,
        class_type: str | None = None,
        input_name: str | None = None,
    ) -> None:
        self.reason = reason
        self.node_id = node_id
        self.class_type = class_type
        self.input_name = input_name
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.node_id is not None:
            where.append(f"node {self.node_id}")
        if self.class_type is not None:
            where.append(f"({self.class_type})")
        if self.input_name is not None:
            where.append(f"input '{self.input_name}'")
        return f"{' '.join(where)}: {self.reason}" if where else self.reason


class ModelFileError(EngineError):
    """A model file is missing, unreadable, outside the store, or of an unknown kind."""


class NodeFailed(EngineError):
    """A node raised while executing."""

    def __init__(self, node_id: str, class_type: str, reason: str) -> None:
        self.node_id = node_id
        self.class_type = class_type
        self.reason = reason
        super().__init__(f"node {node_id} ({class_type}) failed: {reason}")


class Interrupted(EngineError):
    """The run was stopped (Ctrl-C): running nodes stopped at their next step, remote ones were cancelled."""

    def __init__(self, node_id: str | None = None) -> None:
        self.node_id = node_id
        where = f" at node {node_id}" if node_id is not None else ""
        super().__init__(f"interrupted{where}")
