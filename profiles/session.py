"""A whole profile of a workflow: measure, model the link and the worker, plan, maybe run the plan.

:func:`profile_workflow` is what ``diffsplit profile`` and ``diffsplit plan`` do:

1. measure every node in a local run (after warm-up runs);
2. with a worker: probe the link, run the offload candidates there (cold, then
   warm) for their remote times and real wire bytes;
3. build the planner's costs (remote times measured, or from ``--remote-speed``)
   and choose the placement with the lowest predicted end-to-end time;
4. with a worker: run the chosen plan for real once and record the measured
   end-to-end time next to the prediction.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

from diffsplit.engine.graph import Workflow
from diffsplit.profiles.combine import Statistic
from diffsplit.profiles.errors import ProfileError
from diffsplit.profiles.link import LinkModel, ProbeSample, probe_link
from diffsplit.profiles.measure import measure_workflow
from diffsplit.profiles.model import WorkerInfo, WorkflowMeasure
from diffsplit.profiles.planner import Plan, PlanOptions, plan_offload
from diffsplit.profiles.remote_model import NodeCost, RemoteSpeed, node_costs
from diffsplit.profiles.remote_runs import PlanRun, RunSetup, measure_remote, run_plan


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure and assume.

    ``link``/``speed``: given (what-if) link and remote speed; with a worker at
    ``address`` they override what is measured there. ``emulate_link``: run the
    plan against the worker over ``link`` emulated on top of the real link
    (see :mod:`diffsplit.profiles.throttle`). ``queue_s``: a worker queue delay to
    assume per remote call. ``slots``: worker slots (default: what it reports).
    """

    address: str | None = None
    link: LinkModel | None = None
    speed: RemoteSpeed | None = None
    queue_s: float | None = None
    slots: int | None = None
    warmup_runs: int = 1
    measured_runs: int = 1
    statistic: Statistic = "median"
    remote_runs: int = 2
    run_plan: bool = True
    emulate_link: bool = False
    tolerance: float = 0.02
    #: the device the memory probe reads when the setup has no device memory (with one: its device)
    device: str = "cpu"


@dataclass(frozen=True)
class Profile:
    """Everything one profile found: measurements, link, worker, costs, plan and the plan's real run."""

    measure: WorkflowMeasure
    settings: ProfileSettings
    link: LinkModel | None
    link_samples: tuple[ProbeSample, ...]
    worker: WorkerInfo | None
    costs: tuple[NodeCost, ...]
    plan: Plan | None
    plan_run: PlanRun | None
    notes: tuple[str, ...]
    created: str


def profile_workflow(workflow: Workflow, setup: RunSetup, settings: ProfileSettings, *, name: str) -> Profile:
    """Measure ``workflow``, plan its offloading and (with a worker) check the plan for real."""
    notes: list[str] = []
    measure = measure_workflow(
        workflow, setup.registry, setup.store, setup.recipe_for_output, name=name,
        output_dir=setup.output_dir, inputs_dir=setup.inputs_dir, warmup_runs=settings.warmup_runs,
        measured_runs=settings.measured_runs, statistic=settings.statistic, device=settings.device,
        device_memory=setup.device_memory,
    )
    worker, samples, measured_link = None, (), None
    if settings.address is not None:
        measured_link, samples = probe_link(settings.address, timeout_s=setup.timeout_s,
                                            settings=setup.settings, curve=setup.curve)
        worker, refused = measure_remote(workflow, measure, settings.address, measured_link, setup,
                                         runs=settings.remote_runs, statistic=settings.statistic)
        measure = _with_refusals(measure, refused)
        if _shares_this_machine(settings.address):
            notes.append("the worker runs on this machine: where local and remote nodes compute at the same "
                         "time they share its CPU, so the plan's real run can take longer than predicted")
    link = _planning_link(settings, measured_link, notes)
    speed = settings.speed
    if speed is None and worker is None:
        speed = RemoteSpeed(default=1.0)
        notes.append("no worker and no --remote-speed: assuming the worker is as fast as this machine (1x)")
    costs = node_costs(measure, speed, worker, queue_s=settings.queue_s)
    plan = None
    if link is not None:
        slots = settings.slots or (worker.slots if worker is not None else 1)
        options = PlanOptions(slots=slots, tolerance=settings.tolerance)
        plan = plan_offload(costs, link, options=options, overhead_s=measure.overhead_s)
    else:
        notes.append("no link: give --link (e.g. 100mbit,20ms) or --remote to plan offloading")
    plan_run = None
    if plan is not None and settings.address is not None and settings.run_plan:
        emulate = settings.link if settings.emulate_link else None
        plan_run = run_plan(workflow, plan.remote, plan.local_order, settings.address, setup, emulate=emulate)
        assumed = [name for name, given in (("--link", settings.link is not None and emulate is None),
                                            ("--remote-speed", settings.speed is not None)) if given]
        if assumed:
            notes.append(f"the prediction assumes {' and '.join(assumed)}; the plan ran with the real "
                         "worker and link, so the two need not agree")
    return Profile(
        measure=measure, settings=settings, link=link, link_samples=tuple(samples), worker=worker,
        costs=costs, plan=plan, plan_run=plan_run, notes=tuple(notes),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _planning_link(
    settings: ProfileSettings, measured: LinkModel | None, notes: list[str]
) -> LinkModel | None:
    if settings.link is None:
        return measured
    if settings.emulate_link:
        if measured is None:
            raise ProfileError("--emulate-link needs a worker (--remote) to emulate the link to")
        notes.append("the given link is emulated on top of the measured one; predictions use both in series")
        return measured.in_series(settings.link)
    return settings.link


def _shares_this_machine(address: str) -> bool:
    """Whether a worker address points at this machine (loopback, ipc or inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1", "*") or host.startswith("127.")


def _with_refusals(measure: WorkflowMeasure, refused: dict[str, str]) -> WorkflowMeasure:
    if not refused:
        return measure
    nodes = tuple(replace(n, offload_block=refused[n.node_id]) if n.node_id in refused else n
                  for n in measure.nodes)
    return replace(measure, nodes=nodes)
