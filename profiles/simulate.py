"""Predicting the end-to-end time of a placement: a list-scheduling simulation over the DAG.

Lanes: one ``local`` lane (nodes on this machine run one at a time), the
link's ``up`` and ``down`` lanes (one transfer at a time each way), and the
worker's ``remote`` lane with ``slots`` places. A local node occupies the local
lane for its measured time. A remote node is a pipeline: the call's fixed
overhead, its request on the up lane (bytes / bandwidth), half the round trip,
the worker (queue delay + remote time), its reply on the down lane, the other
half of the round trip. Every remote node's inputs go up and its outputs come
back (the runner sends each node as its own request), except conditioning the
worker already holds, which goes as a digest.

A stage that arrives at a free lane takes it at once. When a lane frees up,
the waiting stage with the best priority takes it (on the local lane the node
with the longest remaining path to the end, its upward rank; elsewhere the one
that arrived first), before the stages that the same instant made ready, which
then arrive in node-id order. That is what a real run does: the executor
learns a node finished after its lane was released, and submits the nodes
that became ready in id order. :mod:`diffsplit.profiles.lanes` enforces the
same lanes and priorities in a real run.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from diffsplit.engine.graph import node_sort_key
from diffsplit.profiles.link import LinkModel
from diffsplit.profiles.remote_model import HELD_INPUT_BYTES, NodeCost

Lane = Literal["local", "up", "remote", "down", "wait"]
LANES: tuple[Lane, ...] = ("local", "up", "remote", "down")


@dataclass(frozen=True)
class Segment:
    """One stage of one node on one lane (``wait``: latency or call overhead, no lane held)."""

    lane: Lane
    node_id: str
    start_s: float
    end_s: float
    nbytes: int = 0


@dataclass(frozen=True)
class Timeline:
    """A simulated (or recorded) schedule: segments, node finish times, and the end-to-end time."""

    segments: tuple[Segment, ...]
    finish_s: Mapping[str, float]
    makespan_s: float
    overhead_s: float = 0.0

    @property
    def total_s(self) -> float:
        """Predicted end-to-end time: the schedule plus the run's fixed overhead."""
        return self.makespan_s + self.overhead_s


@dataclass(frozen=True)
class _Stage:
    lane: Lane
    duration_s: float
    nbytes: int = 0


def upward_ranks(costs: Sequence[NodeCost], remote: frozenset[str], link: LinkModel) -> dict[str, float]:
    """Longest time from each node's start to the end of the graph, with this placement."""
    dependents: dict[str, list[str]] = {cost.node_id: [] for cost in costs}
    for cost in costs:
        for dependency in cost.dependencies:
            dependents.setdefault(dependency, []).append(cost.node_id)
    ranks: dict[str, float] = {}
    for cost in reversed(costs):
        if cost.node_id in remote and cost.remote_s is not None:
            own = (cost.call_overhead_s + cost.queue_s + cost.remote_s
                   + link.round_trip_s(cost.request_bytes, cost.reply_bytes))
        else:
            own = cost.local_s + (cost.recipe_s if remote else 0.0)
        after = max((ranks[d] for d in dependents[cost.node_id] if d in ranks), default=0.0)
        ranks[cost.node_id] = own + after
    return ranks


def local_priority(ranks: Mapping[str, float]) -> dict[str, tuple[float, tuple]]:
    """The order in which waiting local nodes get the local lane (smaller first)."""
    return {node_id: (-rank, node_sort_key(node_id)) for node_id, rank in ranks.items()}


def simulate(
    costs: Sequence[NodeCost],
    remote: frozenset[str] | set[str],
    link: LinkModel,
    *,
    slots: int = 1,
    overhead_s: float = 0.0,
    local_order: Sequence[str] | None = None,
) -> Timeline:
    """The schedule of ``costs`` (topological order) with the nodes in ``remote`` on the worker.

    Waiting local nodes get the local lane by upward rank, or in ``local_order``
    where given (the order a plan was run with; nodes it leaves out come last).
    """
    remote = frozenset(remote)
    unknown = sorted(n for n in remote if n not in {c.node_id for c in costs})
    if unknown:
        raise ValueError(f"remote nodes {unknown} are not in the profile")
    simulation = _Simulation(costs, remote, link, max(1, slots))
    if local_order is not None:
        simulation.priority = _fixed_priority(local_order, [cost.node_id for cost in costs])
    return simulation.run(overhead_s)


def _fixed_priority(local_order: Sequence[str], node_ids: Sequence[str]) -> dict[str, tuple[float, tuple]]:
    position = {node_id: index for index, node_id in enumerate(local_order)}
    last = len(position)
    return {node_id: (float(position.get(node_id, last)), node_sort_key(node_id)) for node_id in node_ids}


class _Simulation:
    def __init__(
        self, costs: Sequence[NodeCost], remote: frozenset[str], link: LinkModel, slots: int
    ) -> None:
        self.costs = {cost.node_id: cost for cost in costs}
        self.order = [cost.node_id for cost in costs]
        self.remote = remote
        self.link = link
        self.capacity = {"local": 1, "up": 1, "remote": slots, "down": 1}
        self.busy = dict.fromkeys(self.capacity, 0)
        self.waiting: dict[str, list[tuple[tuple, str, int]]] = {lane: [] for lane in self.capacity}
        self.priority = local_priority(upward_ranks(costs, remote, link))
        self.events: list[tuple[float, int, str, int]] = []
        self.sequence = 0
        self.stages: dict[str, list[_Stage]] = {}
        self.started: dict[tuple[str, int], float] = {}
        self.segments: list[Segment] = []
        self.finish: dict[str, float] = {}
        self.held: set[str] = set()
        self.pending = {n: sum(1 for d in self.costs[n].dependencies if d in self.costs) for n in self.order}
        self.dependents: dict[str, list[str]] = {n: [] for n in self.order}
        for node_id in self.order:
            for dependency in self.costs[node_id].dependencies:
                if dependency in self.dependents:
                    self.dependents[dependency].append(node_id)

    def run(self, overhead_s: float) -> Timeline:
        for node_id in self.order:
            if self.pending[node_id] == 0:
                self._begin_node(node_id, 0.0)
        while self.events:
            now = self.events[0][0]
            follow_ups: list[tuple[str, int]] = []
            while self.events and self.events[0][0] <= now + 1e-12:
                _, _, node_id, index = heapq.heappop(self.events)
                follow_ups.extend(self._stage_done(node_id, index, now))
            self._dispatch(now)
            for node_id, index in sorted(follow_ups, key=lambda item: node_sort_key(item[0])):
                if index == 0:
                    self._begin_node(node_id, now)
                else:
                    self._enter_stage(node_id, index, now)
        if len(self.finish) != len(self.order):
            stuck = sorted(set(self.order) - set(self.finish), key=node_sort_key)
            raise ValueError(f"nodes {stuck} never became ready (a dependency cycle?)")
        makespan = max(self.finish.values(), default=0.0)
        segments = tuple(sorted(self.segments, key=lambda s: (s.start_s, s.lane, node_sort_key(s.node_id))))
        return Timeline(segments, dict(self.finish), makespan, overhead_s)

    def _begin_node(self, node_id: str, now: float) -> None:
        cost = self.costs[node_id]
        if node_id in self.remote and cost.remote_s is not None:
            rtt_half = self.link.rtt_s / 2
            self.stages[node_id] = [
                _Stage("wait", cost.call_overhead_s),
                _Stage("up", 0.0),  # sized when it starts: held conditioning is known then
                _Stage("wait", rtt_half),
                _Stage("remote", cost.queue_s + cost.remote_s),
                _Stage("down", self.link.down_s(cost.reply_bytes), cost.reply_bytes),
                _Stage("wait", rtt_half),
            ]
        else:
            extra = cost.recipe_s if self.remote else 0.0  # the remote runner works out loader recipes
            self.stages[node_id] = [_Stage("local", cost.local_s + extra)]
        self._enter_stage(node_id, 0, now)

    def _enter_stage(self, node_id: str, index: int, now: float) -> None:
        stage = self.stages[node_id][index]
        if stage.lane == "up":
            nbytes = self._request_bytes(node_id)
            stage = self.stages[node_id][index] = _Stage("up", self.link.up_s(nbytes), nbytes)
        if stage.lane == "wait":
            self._start(node_id, index, now)
        elif self.busy[stage.lane] < self.capacity[stage.lane]:
            self.busy[stage.lane] += 1
            self._start(node_id, index, now)
        else:
            key = self.priority[node_id] if stage.lane == "local" else (now, node_sort_key(node_id))
            heapq.heappush(self.waiting[stage.lane], (key, node_id, index))

    def _request_bytes(self, node_id: str) -> int:
        cost = self.costs[node_id]
        held = [size for digest, size in cost.held_inputs if digest in self.held]
        saved = sum(max(0, size - HELD_INPUT_BYTES) for size in held)
        return max(0, cost.request_bytes - saved)

    def _dispatch(self, now: float) -> None:
        for lane in self.capacity:
            queue = self.waiting[lane]
            while queue and self.busy[lane] < self.capacity[lane]:
                _, node_id, index = heapq.heappop(queue)
                self.busy[lane] += 1
                self._start(node_id, index, now)

    def _start(self, node_id: str, index: int, now: float) -> None:
        stage = self.stages[node_id][index]
        self.started[(node_id, index)] = now
        self.sequence += 1
        heapq.heappush(self.events, (now + stage.duration_s, self.sequence, node_id, index))

    def _stage_done(self, node_id: str, index: int, now: float) -> list[tuple[str, int]]:
        """Record a finished stage; what starts next: (node, stage index), index 0 for a new node."""
        stage = self.stages[node_id][index]
        start = self.started.pop((node_id, index))
        if stage.lane != "wait":
            self.busy[stage.lane] -= 1
        if stage.duration_s > 0 or stage.lane in ("local", "remote"):
            self.segments.append(Segment(stage.lane, node_id, start, now, stage.nbytes))
        if index + 1 < len(self.stages[node_id]):
            return [(node_id, index + 1)]
        self.finish[node_id] = now
        if node_id in self.remote:
            self.held.update(digest for digest, _ in self.costs[node_id].held_inputs)
        ready = []
        for dependent in self.dependents[node_id]:
            self.pending[dependent] -= 1
            if self.pending[dependent] == 0:
                ready.append((dependent, 0))
        return ready
