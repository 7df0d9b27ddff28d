"""Runs against a real worker: measuring remote speed per node, and running a chosen plan.

:func:`measure_remote` sends every offload candidate to the worker (a first,
cold run builds the models there; the warm runs after it, combined by their
median or minimum, give the numbers).
A node the worker refuses is taken out and noted, and the run is repeated
without it. :func:`run_plan` runs the workflow with the plan's remote nodes on
the worker, local nodes in the plan's lane order, optionally over an emulated
link, and returns the measured end-to-end time and timeline.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.executor import Executor, NodeRunner, RunResult, run_node_locally
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RecipeForOutput, RemoteNodeStats, RemoteRunner
from diffsplit.engine.store import ModelStore
from diffsplit.profiles.combine import Statistic, combine_remote
from diffsplit.profiles.lanes import LaneRunner, Recorder
from diffsplit.profiles.link import LinkModel
from diffsplit.profiles.local_device import on_device
from diffsplit.profiles.model import RemoteMeasure, WorkerInfo, WorkflowMeasure
from diffsplit.profiles.simulate import Segment, Timeline
from diffsplit.profiles.throttle import LinkEmulator
from diffsplit.transport.auth import ClientCurve
from diffsplit.transport.errors import DiffsplitError
from diffsplit.transport.pool import shared_pool
from diffsplit.transport.protocol import DEFAULT_SETTINGS, Settings
from diffsplit.transport.worker_ops import HELLO, simple_request

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemory


@dataclass(frozen=True)
class RunSetup:
    """What every run needs besides the workflow: registry, store, folders, recipes, timeouts.

    ``settings`` and ``curve``: how to talk to the worker (heartbeats, CURVE keys; None: plain).
    ``device_memory``: where the nodes run here compute (``--device``/``--dtype``; None: as loaded).
    """

    registry: NodeRegistry
    store: ModelStore
    recipe_for_output: RecipeForOutput
    output_dir: Path
    inputs_dir: Path | None = None
    timeout_s: float = 600.0
    settings: Settings = DEFAULT_SETTINGS
    curve: ClientCurve | None = None
    device_memory: DeviceMemory | None = None

    def local(self, inner: NodeRunner, remote: Collection[str] = ()) -> NodeRunner:
        """``inner`` with the nodes run here (all but ``remote``) on this setup's device."""
        return on_device(inner, self.device_memory, remote)

    def executor(self, max_workers: int) -> Executor:
        """An executor over this setup's store and folders."""
        return Executor(self.registry, self.store, inputs_dir=self.inputs_dir, output_dir=self.output_dir,
                        max_workers=max_workers)


@dataclass(frozen=True)
class PlanRun:
    """A plan run for real: its remote nodes, measured end-to-end time and recorded timeline."""

    remote: tuple[str, ...]
    measured_s: float
    timeline: Timeline
    remote_stats: Mapping[str, RemoteNodeStats]


def worker_slots(
    address: str, timeout_s: float = 30.0, *, settings: Settings = DEFAULT_SETTINGS,
    curve: ClientCurve | None = None,
) -> int:
    """How many nodes the worker runs at once (its ``hello``)."""
    with shared_pool().lease(address, settings=settings, curve=curve) as client:
        reply = client.request(simple_request(HELLO), timeout=timeout_s)
    worker = reply.get("worker") or {}
    slots = worker.get("slots", 1)
    return slots if isinstance(slots, int) and slots > 0 else 1


def measure_remote(
    workflow: Workflow,
    measure: WorkflowMeasure,
    address: str,
    link: LinkModel,
    setup: RunSetup,
    *,
    runs: int = 2,
    statistic: Statistic = "median",
) -> tuple[WorkerInfo, dict[str, str]]:
    """Remote numbers for every candidate; also node id → why the worker refused it."""
    refused: dict[str, str] = {}
    candidates = list(measure.candidates)
    while True:
        assigned = {node_id: address for node_id in candidates if node_id not in refused}
        if not assigned:
            return WorkerInfo(address, _slots(address, setup), {}), refused
        try:
            per_run = [_remote_run(workflow, assigned, setup)[1] for _ in range(max(1, runs))]
        except NodeFailed as exc:
            if exc.node_id not in assigned:
                raise
            refused[exc.node_id] = f"the worker could not run it: {exc.reason}"
            continue
        break
    cold, warm = per_run[0], per_run[1:] or per_run
    remote = {
        node_id: combine_remote([_remote_measure(run[node_id], cold.get(node_id), link)
                                 for run in warm if node_id in run], statistic)
        for node_id in warm[-1]
    }
    return WorkerInfo(address, _slots(address, setup), remote), refused


def _slots(address: str, setup: RunSetup) -> int:
    return worker_slots(address, setup.timeout_s, settings=setup.settings, curve=setup.curve)


def _remote_run(
    workflow: Workflow, assigned: Mapping[str, str], setup: RunSetup
) -> tuple[RunResult, dict[str, RemoteNodeStats]]:
    with RemoteRunner(assigned, setup.recipe_for_output, local_store=setup.store,
                      timeout_s=setup.timeout_s, settings=setup.settings, curve=setup.curve) as runner:
        result = setup.executor(1).run(workflow, node_runner=setup.local(runner, assigned))
        return result, runner.stats


def _remote_measure(stats: RemoteNodeStats, cold: RemoteNodeStats | None, link: LinkModel) -> RemoteMeasure:
    """One warm run's numbers; the call's overhead is what the worker's times and the link leave over."""
    on_link = link.round_trip_s(stats.request_bytes, stats.reply_bytes)
    overhead = stats.total_s - stats.queue_s - stats.rebuild_s - stats.run_s - on_link
    return RemoteMeasure(
        node_id=stats.node_id, run_s=stats.run_s, queue_s=stats.queue_s, rebuild_s=stats.rebuild_s,
        cold_rebuild_s=cold.rebuild_s if cold is not None else stats.rebuild_s,
        overhead_s=max(0.0, overhead), request_bytes=stats.request_bytes, reply_bytes=stats.reply_bytes,
        recipe_bytes=stats.recipe_bytes, cache_hits=stats.cache_hits, cache_misses=stats.cache_misses,
    )


def run_plan(
    workflow: Workflow,
    remote: Sequence[str],
    local_order: Sequence[str],
    address: str | None,
    setup: RunSetup,
    *,
    emulate: LinkModel | None = None,
) -> PlanRun:
    """Run ``workflow`` with ``remote`` on the worker at ``address``; measured time and timeline."""
    if remote and address is None:
        raise DiffsplitError("a plan with remote nodes needs a worker address")
    assigned = {node_id: str(address) for node_id in remote}
    recorder = Recorder()
    executor = setup.executor(max(2, len(workflow.nodes)))
    with contextlib.ExitStack() as stack:
        inner: NodeRunner = run_node_locally  # all local: no remote runner, no recipes to work out
        runner = None
        if assigned:
            runner = stack.enter_context(RemoteRunner(assigned, setup.recipe_for_output,
                                                      local_store=setup.store, timeout_s=setup.timeout_s,
                                                      settings=setup.settings, curve=setup.curve))
            inner = LinkEmulator(runner, emulate, recorder)
        lanes = LaneRunner(setup.local(inner, assigned), remote, local_order, recorder)
        origin = recorder.now()
        started = time.perf_counter()
        executor.run(workflow, node_runner=lanes)
        measured = time.perf_counter() - started
        stats = runner.stats if runner is not None else {}
    segments = tuple(_shifted(s, origin) for s in recorder.segments)
    finish: dict[str, float] = {}
    for segment in segments:
        finish[segment.node_id] = max(finish.get(segment.node_id, 0.0), segment.end_s)
    timeline = Timeline(segments, finish, max(finish.values(), default=0.0), 0.0)
    return PlanRun(tuple(remote), measured, timeline, stats)


def _shifted(segment: Segment, origin: float) -> Segment:
    return replace(segment, start_s=segment.start_s - origin, end_s=segment.end_s - origin)

