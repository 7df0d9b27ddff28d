"""What a queued request is told while it waits: its place, and about how long until a slot takes it.

The estimate comes from this worker's own recent jobs of the same kind (op, and
node class or method): their mean time on a slot, times the rounds of slot
turns that must pass before this request starts. No estimate is given for a
kind that has not run here yet.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from diffsplit.engine.lru import LruTable

#: How many recent jobs of one kind the mean runs over.
RUN_TIME_WINDOW = 8
#: How many kinds are remembered (the least recently run is forgotten first).
MAX_KINDS = 256
#: The longest node class or method name kept in a kind.
MAX_KIND_NAME_CHARS = 64


def job_kind(op: str, header: Mapping[str, Any]) -> str:
    """A request's kind, for its estimate: ``run_node KSampler``, ``call forward``, ``upload``."""
    name: object = None
    if op == "run_node":
        node = header.get("node")
        name = node.get("class_type") if isinstance(node, dict) else None
    elif op == "call":
        name = header.get("method")
    return f"{op} {name[:MAX_KIND_NAME_CHARS]}" if isinstance(name, str) else op


def node_label(header: Mapping[str, Any]) -> str | None:
    """The id of the node a ``run_node`` request runs (cut to ``MAX_KIND_NAME_CHARS``), else None."""
    node = header.get("node")
    node_id = node.get("id") if isinstance(node, dict) else None
    return str(node_id)[:MAX_KIND_NAME_CHARS] if isinstance(node_id, str | int) else None


class RunTimes:
    """The slot times of the last ``window`` finished jobs of each kind; thread-safe."""

    def __init__(self, window: int = RUN_TIME_WINDOW, max_kinds: int = MAX_KINDS) -> None:
        if window < 1 or max_kinds < 1:
            raise ValueError(f"window and max_kinds must be at least 1, not {window} and {max_kinds}")
        self._window = window
        self._times: LruTable[str, deque[float]] = LruTable(max_entries=max_kinds)
        self._lock = threading.Lock()

    def record(self, kind: str, seconds: float) -> None:
        """A job of ``kind`` held its slot for ``seconds``."""
        with self._lock:
            times = self._times.get(kind)
            if times is None:
                times = deque(maxlen=self._window)
                self._times.put(kind, times)  # the least recently run kind goes beyond max_kinds
            times.append(max(0.0, seconds))

    def mean(self, kind: str) -> float | None:
        """The mean slot time of the recent jobs of ``kind``; None when none ran here yet."""
        with self._lock:
            times = self._times.peek(kind)
            return sum(times) / len(times) if times else None


def wait_s(mean_s: float | None, *, ahead: int, busy: int, slots: int) -> float | None:
    """About how long until a slot takes a request with ``ahead`` requests before it (None: no mean).

    It starts once ``ahead + busy - slots + 1`` slot turns have ended (the running jobs end, then
    those ahead of it take the slots they free), ``slots`` turns a round of ``mean_s`` each.
    """
    if mean_s is None:
        return None
    turns = max(1, ahead + busy - slots + 1)
    return mean_s * math.ceil(turns / max(1, slots))


def queued_message(*, ahead: int, busy: int, slots: int, eta_s: float | None,
                   node: str | None) -> dict[str, Any]:
    """The progress message that tells a client where its request waits.

    ``queued``: its 1-based place in line; ``waiting``: the same in words; ``node``: the node's id
    when it is a node; ``eta_s``: the estimate (:func:`wait_s`), only when there is one.
    """
    state = f"all {slots} slot(s) busy" if busy >= slots else f"{busy} of {slots} slot(s) busy"
    waiting = f"queued: {ahead} request(s) ahead, {state}"
    message: dict[str, Any] = {"queued": ahead + 1}
    if eta_s is not None:
        waiting += f", about {max(1, round(eta_s))} s"
        message["eta_s"] = float(eta_s)
    message["waiting"] = waiting
    if node is not None:
        message["node"] = node
    return message
