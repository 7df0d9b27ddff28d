"""Choosing the nodes to offload: the placement with the lowest predicted end-to-end time.

Every placement is scored by :func:`diffsplit.profiles.simulate.simulate` (so
local and remote work overlap where the graph allows: the critical path
counts, not the sum). With at most ``exhaustive_limit`` candidates every subset
is tried; with more, a greedy pass adds the best single node until nothing
helps, then single flips and swaps improve the result until none does.
A placement with more remote nodes must beat one with fewer by more than
``tolerance`` (a fraction of the end-to-end time) to be preferred: noise in a
measurement should not send work over the network. Loaders, output nodes and
nodes whose models have no recipe are never candidates (their ``block`` says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from diffsplit.engine.graph import node_sort_key
from diffsplit.profiles.link import LinkModel
from diffsplit.profiles.remote_model import NodeCost
from diffsplit.profiles.simulate import Timeline, local_priority, simulate, upward_ranks


@dataclass(frozen=True)
class PlanOptions:
    """Search settings: worker slots, the preference for fewer remote nodes, the exhaustive limit."""

    slots: int = 1
    tolerance: float = 0.02
    exhaustive_limit: int = 12


@dataclass(frozen=True)
class Verdict:
    """The plan's decision for one node and why; ``flipped_s``: end-to-end time if decided otherwise."""

    node_id: str
    class_type: str
    offload: bool
    short: str
    reason: str
    flipped_s: float | None = None


@dataclass(frozen=True)
class Plan:
    """The chosen placement, its predicted timeline, and the all-local prediction to compare."""

    remote: tuple[str, ...]
    timeline: Timeline
    all_local: Timeline
    verdicts: tuple[Verdict, ...]
    local_order: tuple[str, ...]
    search: Literal["exhaustive", "greedy"]
    evaluated: int

    @property
    def predicted_s(self) -> float:
        """Predicted end-to-end seconds of the plan."""
        return self.timeline.total_s

    @property
    def speedup(self) -> float:
        """All-local predicted time over the plan's."""
        return self.all_local.total_s / self.predicted_s if self.predicted_s > 0 else 1.0


class _Scorer:
    """Simulates placements once each and remembers the results."""

    def __init__(self, costs: Sequence[NodeCost], link: LinkModel, options: PlanOptions, overhead_s: float):
        self.costs, self.link, self.options, self.overhead_s = tuple(costs), link, options, overhead_s
        self.seen: dict[frozenset[str], Timeline] = {}

    def __call__(self, remote: frozenset[str]) -> Timeline:
        if remote not in self.seen:
            self.seen[remote] = simulate(self.costs, remote, self.link, slots=self.options.slots,
                                         overhead_s=self.overhead_s)
        return self.seen[remote]

    def better(self, a: frozenset[str], b: frozenset[str]) -> bool:
        """Whether placement ``a`` is preferred to ``b`` (time, with the tolerance for more remote nodes)."""
        ta, tb = self(a).total_s, self(b).total_s
        margin = self.options.tolerance * max(ta, tb)
        if len(a) > len(b):
            return ta < tb - margin
        if len(a) < len(b):
            return ta <= tb + margin
        return (ta, sorted(a, key=node_sort_key)) < (tb, sorted(b, key=node_sort_key))


def plan_offload(
    costs: Sequence[NodeCost],
    link: LinkModel,
    *,
    options: PlanOptions | None = None,
    overhead_s: float = 0.0,
) -> Plan:
    """The best placement of ``costs`` (topological order) over ``link``; ``overhead_s``: fixed run cost."""
    options = options or PlanOptions()
    scorer = _Scorer(costs, link, options, overhead_s)
    candidates = [cost.node_id for cost in costs if cost.offloadable]
    if len(candidates) <= options.exhaustive_limit:
        best, search = _exhaustive(candidates, scorer), "exhaustive"
    else:
        best, search = _greedy(candidates, scorer), "greedy"
    timeline = scorer(best)
    ranks = upward_ranks(costs, best, link)
    priority = local_priority(ranks)
    local_order = tuple(sorted((c.node_id for c in costs if c.node_id not in best), key=priority.__getitem__))
    return Plan(
        remote=tuple(sorted(best, key=node_sort_key)), timeline=timeline, all_local=scorer(frozenset()),
        verdicts=tuple(_verdicts(costs, best, scorer)), local_order=local_order, search=search,
        evaluated=len(scorer.seen),
    )


def _exhaustive(candidates: list[str], scorer: _Scorer) -> frozenset[str]:
    """Every subset; among those within the tolerance of the fastest, the one with fewest remote nodes."""
    placements = [frozenset(subset) for size in range(len(candidates) + 1)
                  for subset in combinations(candidates, size)]
    fastest = min(scorer(p).total_s for p in placements)
    limit = fastest * (1 + scorer.options.tolerance)
    return min((p for p in placements if scorer(p).total_s <= limit),
               key=lambda p: (len(p), scorer(p).total_s, sorted(p, key=node_sort_key)))


def _greedy(candidates: list[str], scorer: _Scorer) -> frozenset[str]:
    current: frozenset[str] = frozenset()
    while True:
        options = [current | {node} for node in candidates if node not in current]
        best = min(options, key=lambda p: scorer(p).total_s, default=None)
        if best is None or not scorer.better(best, current):
            break
        current = best
    improved = True
    while improved:
        improved = False
        neighbours = [current ^ {node} for node in candidates]
        neighbours += [(current - {a}) | {b} for a in current for b in candidates if b not in current]
        for placement in neighbours:
            if scorer.better(placement, current):
                current, improved = placement, True
                break
    return current


def _verdicts(costs: Sequence[NodeCost], best: frozenset[str], scorer: _Scorer) -> list[Verdict]:
    chosen = scorer(best).total_s
    verdicts = []
    for cost in costs:
        if not cost.offloadable:
            block = cost.block or "no remote estimate"
            short = block.split(":", 1)[0]
            verdicts.append(Verdict(cost.node_id, cost.class_type, False, short, f"stays local: {block}"))
            continue
        other = scorer(best ^ {cost.node_id}).total_s
        transfer = scorer.link.round_trip_s(cost.request_bytes, cost.reply_bytes)
        work = (f"local {cost.local_s:.3f} s vs remote {cost.remote_s:.3f} s + link {transfer:.3f} s"
                f" + call {cost.call_overhead_s + cost.queue_s:.3f} s")
        if cost.node_id in best:
            short = f"saves {other - chosen:.3f} s"
            reason = f"offload: {chosen:.3f} s end-to-end, {other:.3f} s if it stays local ({work})"
        elif chosen - other >= 0.0005:
            short = f"gain under {scorer.options.tolerance:.0%}"
            reason = (f"keep local: offloading saves only {chosen - other:.3f} s end-to-end, "
                      f"under the {scorer.options.tolerance:.0%} threshold ({work})")
        elif other - chosen < 0.0005:
            short = "no gain"
            reason = f"keep local: offloading changes the end-to-end time by under 0.5 ms ({work})"
        else:
            short = f"+{other - chosen:.3f} s if offloaded"
            reason = (f"keep local: offloading it would take {other:.3f} s end-to-end, "
                      f"not {chosen:.3f} s ({work})")
        verdicts.append(Verdict(cost.node_id, cost.class_type, cost.node_id in best, short, reason, other))
    return verdicts
