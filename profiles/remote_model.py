"""How fast each node would run on a worker: measured there, or a given speed-up.

``--remote-speed 8x`` says the worker runs every node 8 times faster than this
machine did; ``--remote-speed KSampler=10x`` sets one class and ``6=4x`` one
node (a node wins over a class, a class over the default). A node measured on
a worker uses the measurement unless the user named a speed for it or its class.
:func:`node_costs` joins the local measure and these estimates into the
planner's input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from diffsplit.profiles.model import WorkerInfo, WorkflowMeasure
from diffsplit.transport.errors import DiffsplitError

#: Per-request cost of a remote call when nothing was measured (encode, decode, hand-offs).
DEFAULT_CALL_OVERHEAD_S = 0.003
#: Bytes a conditioning input costs when the worker already holds it (sent as its digest).
HELD_INPUT_BYTES = 80

_FACTOR = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x?\s*$", re.IGNORECASE)


class RemoteSpeedError(DiffsplitError):
    """A ``--remote-speed`` value that cannot be read."""


@dataclass(frozen=True)
class RemoteSpeed:
    """Speed-ups of the worker over this machine: a default, per class and per node."""

    default: float | None = None
    by_class: Mapping[str, float] = field(default_factory=dict)
    by_node: Mapping[str, float] = field(default_factory=dict)

    def factor_for(self, node_id: str, class_type: str) -> float | None:
        """The speed-up named for this node (node, then class, then default), or None."""
        if node_id in self.by_node:
            return self.by_node[node_id]
        if class_type in self.by_class:
            return self.by_class[class_type]
        return self.default

    def is_explicit_for(self, node_id: str, class_type: str) -> bool:
        """Whether the user named a speed for this very node or its class."""
        return node_id in self.by_node or class_type in self.by_class


def parse_remote_speed(values: Sequence[str]) -> RemoteSpeed:
    """``["8x", "KSampler=10x", "6=4"]`` → RemoteSpeed; RemoteSpeedError on a bad value."""
    default: float | None = None
    by_class: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for text in values:
        target, separator, value = text.rpartition("=")
        factor = _factor(value if separator else text, text)
        target = target.strip()
        if not separator:
            if default is not None:
                raise RemoteSpeedError(f"--remote-speed {text!r}: the default speed-up is given twice")
            default = factor
        elif not target:
            raise RemoteSpeedError(f"--remote-speed {text!r}: name a node id or a class before '='")
        elif target.replace(":", "").isdigit():
            by_node[target] = factor
        else:
            by_class[target] = factor
    return RemoteSpeed(default, by_class, by_node)


def _factor(value: str, text: str) -> float:
    match = _FACTOR.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise RemoteSpeedError(
            f"--remote-speed {text!r}: {value.strip()!r} is not a positive speed-up such as 8x or 0.5x"
        )
    return float(match.group(1))


@dataclass(frozen=True)
class NodeCost:
    """What the planner knows of one node: local time, remote time, and bytes each way.

    ``held_inputs``: (digest, wire bytes) of CONDITIONING inputs; a worker that got
    the same digest before receives only the digest. ``recipe_s``: extra local
    time of a loader when anything is offloaded (its recipes are worked out).
    """

    node_id: str
    class_type: str
    dependencies: tuple[str, ...]
    local_s: float
    remote_s: float | None
    call_overhead_s: float
    queue_s: float
    request_bytes: int
    reply_bytes: int
    held_inputs: tuple[tuple[str, int], ...] = ()
    source: Literal["measured", "factor", "none"] = "none"
    block: str | None = None
    recipe_s: float = 0.0

    @property
    def offloadable(self) -> bool:
        """Whether the node may go to a worker (and a remote time is known)."""
        return self.block is None and self.remote_s is not None


def node_costs(
    measure: WorkflowMeasure,
    speed: RemoteSpeed | None = None,
    worker: WorkerInfo | None = None,
    *,
    queue_s: float | None = None,
) -> tuple[NodeCost, ...]:
    """The planner's view of every measured node, in topological order.

    ``queue_s``: a worker queue delay to add to every remote call (default: the
    delay the worker reported while measuring, else 0).
    """
    speed = speed or RemoteSpeed()
    remote = dict(worker.remote) if worker is not None else {}
    present = {m.node_id for m in measure.nodes}
    costs = []
    for node in measure.nodes:
        measured = remote.get(node.node_id)
        factor = speed.factor_for(node.node_id, node.class_type)
        use_measured = measured is not None and not speed.is_explicit_for(node.node_id, node.class_type)
        remote_s: float | None
        if use_measured and measured is not None:
            remote_s, overhead, source = measured.run_s + measured.rebuild_s, measured.overhead_s, "measured"
            node_queue = measured.queue_s if queue_s is None else queue_s
        elif factor is not None:
            remote_s, overhead, source = node.wall_s / factor, DEFAULT_CALL_OVERHEAD_S, "factor"
            node_queue = queue_s or 0.0
        else:
            remote_s, overhead, source, node_queue = None, 0.0, "none", 0.0
        block = node.offload_block or (None if remote_s is not None or node.cache_hit
                                       else "no remote speed: measure on a worker or give --remote-speed")
        costs.append(NodeCost(
            node_id=node.node_id, class_type=node.class_type,
            dependencies=tuple(d for d in node.dependencies if d in present),
            local_s=node.wall_s, remote_s=remote_s, call_overhead_s=overhead, queue_s=node_queue,
            request_bytes=node.request_bytes, reply_bytes=node.reply_bytes,
            held_inputs=tuple((i.digest, i.wire_bytes) for i in node.inputs if i.digest is not None),
            source=source, block=block, recipe_s=node.recipe_s,
        ))
    return tuple(costs)
