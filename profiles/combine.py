"""Combining repeated measurements: per node, the median or the minimum over the runs.

On a busy machine noise only ever adds time, so the minimum estimates the
undisturbed cost; the median is the robust default. Memory keeps the highest
peak; bytes and verdicts come from the last run (they do not change).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Literal

from diffsplit.profiles.model import NodeMeasure, RemoteMeasure, WorkerInfo, WorkflowMeasure

#: How repeated measurements are combined.
Statistic = Literal["median", "min"]


def summarize(values: Iterable[float], statistic: Statistic = "median") -> float:
    """The median or the minimum of ``values``."""
    items = list(values)
    return min(items) if statistic == "min" else statistics.median(items)


def combine_measures(runs: Sequence[WorkflowMeasure], statistic: Statistic = "median") -> WorkflowMeasure:
    """One measure from several runs of the same workflow (nodes as in the last run)."""
    if not runs:
        raise ValueError("nothing to combine")
    last = runs[-1]
    if len(runs) == 1:
        return last
    by_run = [run.by_id for run in runs]
    nodes = tuple(_node([run[node.node_id] for run in by_run if node.node_id in run], statistic)
                  for node in last.nodes)
    return replace(
        last, nodes=nodes, total_s=summarize((r.total_s for r in runs), statistic),
        overhead_s=summarize((r.overhead_s for r in runs), statistic),
        measured_runs=sum(r.measured_runs for r in runs),
    )


def _node(measures: list[NodeMeasure], statistic: Statistic) -> NodeMeasure:
    last = measures[-1]
    peak = max(measures, key=lambda m: m.memory.peak_bytes).memory
    return replace(last, wall_s=summarize((m.wall_s for m in measures), statistic),
                   cpu_s=summarize((m.cpu_s for m in measures), statistic), memory=peak)


def combine_remote(runs: Sequence[RemoteMeasure], statistic: Statistic = "median") -> RemoteMeasure:
    """One node's remote measurements over several warm runs (cold rebuild: the highest seen)."""
    if not runs:
        raise ValueError("nothing to combine")

    def pick(field: str) -> float:
        return summarize((getattr(run, field) for run in runs), statistic)

    return replace(runs[-1], run_s=pick("run_s"), queue_s=pick("queue_s"), rebuild_s=pick("rebuild_s"),
                   overhead_s=pick("overhead_s"), cold_rebuild_s=max(r.cold_rebuild_s for r in runs))


def combine_workers(runs: Sequence[WorkerInfo], statistic: Statistic = "median") -> WorkerInfo:
    """Remote measurements of the same worker over several rounds, per node."""
    if not runs:
        raise ValueError("nothing to combine")
    last = runs[-1]
    remote = {
        node_id: combine_remote([run.remote[node_id] for run in runs if node_id in run.remote], statistic)
        for node_id in last.remote
    }
    return replace(last, remote=remote)
