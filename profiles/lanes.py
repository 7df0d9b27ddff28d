"""Running a plan the way the simulator predicts it: one local lane, priorities, a recorded timeline.

:class:`PriorityGate` is a semaphore that, when a permit frees, hands it to the
waiter with the smallest key (a waiter arriving at a free gate takes it at
once). :class:`LaneRunner` wraps a node runner: local nodes pass the local
gate one at a time, in the plan's priority order; remote nodes go straight to
the inner runner (the remote runner). It records when each node held its lane,
so a real run can be drawn next to the prediction (remote nodes are recorded
by :class:`diffsplit.profiles.throttle.LinkEmulator`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from diffsplit.engine.executor import NodeCall, NodeRunner
from diffsplit.profiles.simulate import Lane, Segment


class PriorityGate:
    """``permits`` holders at a time; freed permits go to the waiter with the smallest key."""

    def __init__(self, permits: int = 1) -> None:
        if permits < 1:
            raise ValueError("a gate needs at least one permit")
        self._condition = threading.Condition()
        self._free = permits
        self._waiting: list[tuple[Any, int]] = []
        self._tickets = itertools.count()

    @contextlib.contextmanager
    def hold(self, key: Any) -> Iterator[None]:
        """Wait for a permit (best key first), hold it for the block, then release it."""
        ticket = next(self._tickets)
        entry = (key, ticket)
        with self._condition:
            heapq.heappush(self._waiting, entry)
            while not (self._free > 0 and self._waiting[0] == entry):
                self._condition.wait()
            heapq.heappop(self._waiting)
            self._free -= 1
            self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._free += 1
                self._condition.notify_all()


class Recorder:
    """Thread-safe list of timeline segments, timed from its creation."""

    def __init__(self) -> None:
        self._origin = time.perf_counter()
        self._lock = threading.Lock()
        self._segments: list[Segment] = []

    def now(self) -> float:
        """Seconds since the recorder was created."""
        return time.perf_counter() - self._origin

    @contextlib.contextmanager
    def segment(self, lane: Lane, node_id: str, nbytes: int = 0) -> Iterator[None]:
        """Record the block as one segment on ``lane``."""
        start = self.now()
        try:
            yield
        finally:
            self.add(Segment(lane, node_id, start, self.now(), nbytes))

    def add(self, segment: Segment) -> None:
        """Record one segment."""
        with self._lock:
            self._segments.append(segment)

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The segments so far, by start time."""
        with self._lock:
            return tuple(sorted(self._segments, key=lambda s: (s.start_s, s.lane)))


class LaneRunner:
    """A node runner: local nodes one at a time in priority order, remote ones straight through."""

    def __init__(
        self,
        inner: NodeRunner,
        remote: Collection[str],
        local_order: Sequence[str],
        recorder: Recorder | None = None,
    ) -> None:
        self.inner = inner
        self.remote = frozenset(remote)
        self.rank: Mapping[str, int] = {node_id: index for index, node_id in enumerate(local_order)}
        self.recorder = recorder or Recorder()
        self.gate = PriorityGate(1)

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        node_id = call.node.id
        if node_id in self.remote:
            return self.inner(call)  # the link emulator records the remote stages
        with self.gate.hold(self.rank.get(node_id, len(self.rank))), self.recorder.segment("local", node_id):
            return self.inner(call)
