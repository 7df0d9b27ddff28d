"""Where each condition's preprocessing runs, and how the link is shared, so every condition is ready soonest.

A multi-condition workflow preprocesses each condition (Canny, depth, pose...)
before sampling, which runs on a worker. Each condition can be preprocessed

- **here**: the local device works through its conditions one after another,
  and each finished hint goes up the link, or
- **on the worker**: each condition's source image goes up the link, and the
  worker preprocesses them one after another as they arrive. A worker answers
  each node with its outputs, so such a hint also comes back down and goes up
  again with the sampler's request; the report counts that in its remote time
  (:func:`returned_remote_s`).

Both paths run at once and share the link: the hints get a fraction ``share``
of its bandwidth, the sources the rest. Each path is a two-stage flow shop
(compute then send here, send then compute there), so its best order is
Johnson's rule and its finish time follows; the conditions are all ready when
the slower path finishes. For one split of the conditions, the best share
makes the two paths finish together (found by bisection: one path gets faster
as its share grows, the other slower).

:func:`plan_conditions` is the heuristic: each condition first where it alone is
faster, then single moves between the paths while they shorten the time. The
brute force, :func:`best_plan`, tries every split; ``bench/test_condition_plan_bench.py``
measures the heuristic's gap to it on random cases of up to 6 conditions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from diffsplit.profiles.errors import ProfileError

LOCAL = "local"
REMOTE = "remote"
#: Bisection steps for the link share (2^-40 of the link: far below any measured figure).
_SHARE_STEPS = 40
#: The most conditions the brute force takes (2^n splits).
MAX_BRUTE_FORCE = 16


@dataclass(frozen=True)
class ConditionCost:
    """What one condition costs either way, from measurements (``diffsplit profile``)."""

    name: str
    local_s: float  # preprocessing on this machine
    remote_s: float  # preprocessing on the worker
    source_bytes: int  # what goes up when the worker preprocesses it (its input image)
    hint_bytes: int  # what goes up when it is preprocessed here (the condition map)

    def __post_init__(self) -> None:
        for field in ("local_s", "remote_s"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ProfileError(f"condition {self.name!r}: {field} must be a finite time >= 0, "
                                   f"not {value}")
        for field in ("source_bytes", "hint_bytes"):
            if getattr(self, field) < 0:
                raise ProfileError(f"condition {self.name!r}: {field} must be >= 0")


@dataclass(frozen=True)
class Link:
    """The link up to the worker: its rate and one-way latency."""

    bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.bytes_per_s > 0 and math.isfinite(self.bytes_per_s)):
            raise ProfileError(f"a link's rate must be a finite number of bytes/s above 0, "
                               f"not {self.bytes_per_s}")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ProfileError(f"a link's latency must be a finite time >= 0, not {self.latency_s}")


@dataclass(frozen=True)
class Placement:
    """One condition in a plan: where it is preprocessed, in which order on its path, its link share."""

    name: str
    where: str  # LOCAL or REMOTE
    order: int  # its place on its path (Johnson's order)
    share: float  # the fraction of the link its path's transfers get (the path's whole share)


@dataclass(frozen=True)
class ConditionPlan:
    """Where each condition goes and when all are ready (seconds from the start)."""

    placements: tuple[Placement, ...]
    ready_s: float
    local_share: float  # the link's fraction for hints sent from here; the rest carries sources

    def where(self, name: str) -> str:
        for placement in self.placements:
            if placement.name == name:
                return placement.where
        raise KeyError(name)

    def describe(self) -> str:
        """One line per condition, then when all are ready."""
        lines = [f"  {p.name:<24} {p.where:<6} #{p.order + 1}  link share {p.share:5.1%}"
                 for p in self.placements]
        return "\n".join([*lines, f"  all conditions ready after {self.ready_s:.3f} s"])


def plan_conditions(costs: Sequence[ConditionCost], link: Link) -> ConditionPlan:
    """The heuristic plan: each condition where it alone is faster, then the best single move or swap of
    two conditions between the paths while one shortens the time (O(n^2) splits tried per round)."""
    _check_names(costs)
    remote = {index for index, cost in enumerate(costs)
              if _alone_remote(cost, link) < _alone_local(cost, link)}
    best_time, _ = _split_time(costs, remote, link)
    while True:
        here = [index for index in range(len(costs)) if index not in remote]
        moves = [remote ^ {index} for index in range(len(costs))]
        moves += [remote ^ {local, sent} for local in here for sent in remote]
        timed = [(_split_time(costs, moved, link)[0], sorted(moved)) for moved in moves]
        if not timed:
            break
        time, moved = min(timed)
        if time >= best_time - 1e-12:
            break
        remote, best_time = set(moved), time
    return _plan(costs, remote, link)


def best_plan(costs: Sequence[ConditionCost], link: Link) -> ConditionPlan:
    """The optimal plan of this model, by trying every split (at most :data:`MAX_BRUTE_FORCE` conditions)."""
    _check_names(costs)
    if len(costs) > MAX_BRUTE_FORCE:
        raise ProfileError(f"the brute force takes at most {MAX_BRUTE_FORCE} conditions, not {len(costs)}")
    splits = (set(chosen) for size in range(len(costs) + 1)
              for chosen in itertools.combinations(range(len(costs)), size))
    remote = min(splits, key=lambda split: _split_time(costs, split, link)[0])
    return _plan(costs, remote, link)


def _check_names(costs: Sequence[ConditionCost]) -> None:
    names = [cost.name for cost in costs]
    if len(set(names)) != len(names):
        raise ProfileError(f"condition names must be distinct: {names}")


def _alone_local(cost: ConditionCost, link: Link) -> float:
    return cost.local_s + link.latency_s + cost.hint_bytes / link.bytes_per_s


def _alone_remote(cost: ConditionCost, link: Link) -> float:
    return link.latency_s + cost.source_bytes / link.bytes_per_s + cost.remote_s


def _plan(costs: Sequence[ConditionCost], remote: set[int], link: Link) -> ConditionPlan:
    ready, share = _split_time(costs, remote, link)
    local_jobs = [(costs[i].local_s, costs[i].hint_bytes, i) for i in range(len(costs)) if i not in remote]
    remote_jobs = [(costs[i].source_bytes, costs[i].remote_s, i) for i in sorted(remote)]
    order = {index: place for place, index in enumerate(job[2] for job in _johnson(local_jobs))}
    order.update({index: place for place, index in enumerate(job[2] for job in _johnson(remote_jobs))})
    placements = tuple(
        Placement(cost.name, REMOTE if index in remote else LOCAL, order[index],
                  1 - share if index in remote else share)
        for index, cost in enumerate(costs))
    return ConditionPlan(placements, ready, share)


def _split_time(costs: Sequence[ConditionCost], remote: Iterable[int], link: Link) -> tuple[float, float]:
    """When all are ready for this split, and the hints' share of the link that gets there."""
    remote = set(remote)
    local_jobs = [(costs[i].local_s, float(costs[i].hint_bytes))
                  for i in range(len(costs)) if i not in remote]
    remote_jobs = [(float(costs[i].source_bytes), costs[i].remote_s) for i in sorted(remote)]

    def local_time(share: float) -> float:
        if not local_jobs:
            return 0.0
        rate = share * link.bytes_per_s
        return _flow_shop([(compute, sent / rate if rate > 0 else math.inf) for compute, sent in local_jobs],
                          latency_after=link.latency_s)

    def remote_time(share: float) -> float:
        if not remote_jobs:
            return 0.0
        rate = share * link.bytes_per_s
        return _flow_shop([(sent / rate if rate > 0 else math.inf, compute) for sent, compute in remote_jobs],
                          latency_between=link.latency_s)

    if not remote_jobs:
        return local_time(1.0), 1.0
    if not local_jobs:
        return remote_time(1.0), 0.0
    low, high = 0.0, 1.0  # the hints' share: local_time falls and remote_time rises as it grows
    for _ in range(_SHARE_STEPS):
        middle = (low + high) / 2
        if local_time(middle) > remote_time(1 - middle):
            low = middle
        else:
            high = middle
    candidates = (low, high)
    share = min(candidates, key=lambda s: max(local_time(s), remote_time(1 - s)))
    return max(local_time(share), remote_time(1 - share)), share


def _johnson(jobs: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Johnson's order for a two-stage flow shop: first-stage-shorter jobs by first stage, then the rest
    by second stage, longest first (ties by index, so plans are stable)."""
    first = sorted((job for job in jobs if job[0] <= job[1]), key=lambda job: (job[0], job[2]))
    second = sorted((job for job in jobs if job[0] > job[1]), key=lambda job: (-job[1], job[2]))
    return first + second


def _flow_shop(jobs: Sequence[tuple[float, float]], *, latency_after: float = 0.0,
               latency_between: float = 0.0) -> float:
    """The makespan of two-stage jobs in Johnson's order; ``latency_between`` delays each job's second stage
    after its first (a send reaching the worker), ``latency_after`` the end (the last hint arriving)."""
    ordered = _johnson([(a, b, n) for n, (a, b) in enumerate(jobs)])
    first_done = second_done = 0.0
    for a, b, _ in ordered:
        first_done += a
        second_done = max(second_done, first_done + latency_between) + b
    return second_done + latency_after


#: The node category of condition preprocessors (Canny and those to come).
PREPROCESSOR_CATEGORY = "image/preprocessors"


class NodeCostLike(Protocol):
    """What the report needs of a node's costs (``profiles.remote_model.NodeCost``)."""

    node_id: str
    class_type: str
    local_s: float
    remote_s: float | None
    request_bytes: int
    reply_bytes: int


class LinkLike(Protocol):
    """What the report needs of the link (``profiles.link.LinkModel``)."""

    rtt_s: float
    up_bytes_per_s: float
    down_bytes_per_s: float


def returned_remote_s(remote_s: float, hint_bytes: int, link: LinkLike) -> float:
    """A worker-preprocessed condition's time until its hint is back on the worker with the sampler.

    A worker answers each node with its outputs: the hint comes down (one round trip) and goes up
    again inside the sampler's conditioning, so those transfers count on the worker's path.
    """
    return remote_s + link.rtt_s + hint_bytes / link.down_bytes_per_s + hint_bytes / link.up_bytes_per_s


@dataclass(frozen=True)
class ConditionReport:
    """The plan for a profiled workflow's conditions, beside doing them all here or all there."""

    plan: ConditionPlan
    all_local_s: float
    all_remote_s: float
    #: node id -> where the plan preprocesses it (LOCAL or REMOTE)
    where: Mapping[str, str]

    def lines(self) -> list[str]:
        better = min(self.all_local_s, self.all_remote_s)
        gain = 1 - self.plan.ready_s / better if better > 0 else 0.0
        return [*self.plan.describe().splitlines(),
                f"  all here {self.all_local_s:.3f} s, all on the worker {self.all_remote_s:.3f} s: the plan "
                f"is {gain:.0%} sooner than the better of the two"]


def condition_report(costs: Sequence[NodeCostLike], categories: Mapping[str, str],
                     link: LinkLike) -> ConditionReport | None:
    """The plan for the preprocessor nodes among ``costs`` (None without two ways to compare: no link, no
    preprocessor, or no remote time for one). ``categories``: node class -> its category."""
    chosen = [cost for cost in costs if categories.get(cost.class_type) == PREPROCESSOR_CATEGORY]
    if not chosen or any(cost.remote_s is None for cost in chosen):
        return None
    conditions = [ConditionCost(f"{cost.node_id} {cost.class_type}", local_s=cost.local_s,
                                remote_s=returned_remote_s(float(cost.remote_s or 0.0), cost.reply_bytes,
                                                           link),
                                source_bytes=cost.request_bytes, hint_bytes=cost.reply_bytes)
                  for cost in chosen]
    up = Link(bytes_per_s=link.up_bytes_per_s, latency_s=link.rtt_s / 2)
    everything = set(range(len(conditions)))
    plan = plan_conditions(conditions, up)
    node_of = {condition.name: cost.node_id for condition, cost in zip(conditions, chosen, strict=True)}
    return ConditionReport(plan, all_local_s=_split_time(conditions, set(), up)[0],
                           all_remote_s=_split_time(conditions, everything, up)[0],
                           where={node_of[p.name]: p.where for p in plan.placements})
