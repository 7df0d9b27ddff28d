"""Per-node measurements of a local run: time, CPU, memory, bytes by category, wire bytes.

:class:`MeasuringRunner` wraps a node runner (the executor's ``node_runner``
seam). Around each node it reads the clocks and the memory probe; after the
node (outside its timing) it works out what offloading it would send: each
input by category, the request and reply wire bytes, the model files a naive
design would ship, and whether the node can be offloaded at all.
:func:`measure_workflow` runs a workflow with it, one node at a time (so the
numbers of one node are not mixed with another's) through the same local lane
a plan's run uses (:class:`~diffsplit.profiles.lanes.LaneRunner`), so the
executor's own cost in the profile is the cost it has when the plan runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.executor import Executor, NodeCall, NodeRunner, run_node_locally
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.offload import RecipeForOutput
from diffsplit.engine.store import ModelStore
from diffsplit.engine.wire_values import is_model_value
from diffsplit.profiles.combine import Statistic, combine_measures
from diffsplit.profiles.lanes import LaneRunner
from diffsplit.profiles.local_device import device_label, dtype_names, on_device, probe_device
from diffsplit.profiles.memory import MemoryProbe
from diffsplit.profiles.model import MemoryMeasure, NodeMeasure, Role, WorkflowMeasure
from diffsplit.profiles.sizes import reply_size, request_size
from diffsplit.profiles.weights import naive_weight_files
from diffsplit.tracer.fingerprint import fingerprint

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemory


class _WatchingContext:
    """A node context that forwards everything and notes the local files a node touches that a worker
    cannot have: input files, the output folder. Model files a node reads itself (a preprocessor's
    network, a prompt's embeddings) do not count: an offloaded node gets them by sha256
    (``engine.run_files``), as loaders' files go in recipes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.node_id = inner.node_id
        self.local_files: list[str] = []

    def model_path(self, folder: str, name: str) -> Path:
        return self._inner.model_path(folder, name)

    def input_path(self, name: str) -> Path:
        self.local_files.append(f"reads the local input file {name!r}")
        return self._inner.input_path(name)

    def output_dir(self) -> Path:
        self.local_files.append("writes files into the output folder")
        return self._inner.output_dir()

    def progress(self, step: int, total: int) -> None:
        self._inner.progress(step, total)

    def save_image(self, image: Any, filename_prefix: str, *, temporary: bool) -> Path:
        self.local_files.append("saves images")
        return self._inner.save_image(image, filename_prefix, temporary=temporary)


@dataclass(frozen=True)
class _Timed:
    wall_s: float
    cpu_s: float
    memory: MemoryMeasure


@dataclass(frozen=True)
class _Finished:
    """A node that ran, kept until its measure is worked out (after the run, off the clock)."""

    call: NodeCall
    outputs: Sequence[Any]
    timed: _Timed
    local_files: tuple[str, ...]


class MeasuringRunner:
    """A node runner that measures every node it runs; thread-safe. Read :attr:`measures` after.

    During the run it only reads clocks and memory; the bytes, weights and
    offloadability of each node are worked out when :attr:`measures` is read
    (the run keeps every node's inputs and outputs alive anyway).
    """

    def __init__(
        self,
        workflow: Workflow,
        registry: NodeRegistry,
        store: ModelStore | None,
        probe: MemoryProbe,
        recipe_for_output: RecipeForOutput,
        *,
        inner: NodeRunner = run_node_locally,
    ) -> None:
        self.workflow = workflow
        self.registry = registry
        self.store = store
        self.probe = probe
        self.recipe_for_output = recipe_for_output
        self.inner = inner
        self._lock = threading.Lock()
        self._working = threading.Lock()
        self._recipes: dict[int, tuple[Any, Mapping[str, Any]]] = {}
        self._finished: list[_Finished] = []
        self._measures: dict[str, NodeMeasure] = {}

    @property
    def measures(self) -> dict[str, NodeMeasure]:
        """Node id → measure of every node run so far."""
        with self._working:
            with self._lock:
                finished, self._finished = self._finished, []
            for done in finished:  # in the order the nodes finished: loaders before their consumers
                measure = self._measure(done.call, done.outputs, done.timed, list(done.local_files))
                with self._lock:
                    self._measures[done.call.node.id] = measure
            with self._lock:
                return dict(self._measures)

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        context = _WatchingContext(call.context)
        watched = replace(call, context=context)
        mark = self.probe.begin()
        cpu_started = time.process_time()
        started = time.perf_counter()
        try:
            outputs = self.inner(watched)
        finally:
            wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
            timed = _Timed(wall_s, cpu_s, self.probe.end(mark))
        with self._lock:
            self._finished.append(_Finished(call, outputs, timed, tuple(context.local_files)))
        return outputs

    def recipe_of(self, value: Any) -> Mapping[str, Any] | None:
        """The recipe of a model a loader returned in this run, or None."""
        with self._lock:
            known = self._recipes.get(id(value))
        return known[1] if known is not None and known[0] is value else None

    def _measure(
        self, call: NodeCall, outputs: Sequence[Any], timed: _Timed, local_files: list[str]
    ) -> NodeMeasure:
        node, node_class = call.node, call.node_class
        role: Role = "loader" if node_class.is_loader else "output" if node_class.output_node else "compute"
        base = NodeMeasure(
            node_id=node.id, class_type=node.class_type, title=node.title,
            dependencies=tuple(sorted(self.workflow.dependencies(node.id) & set(self.workflow.nodes))),
            role=role, cache_hit=False, wall_s=timed.wall_s, cpu_s=timed.cpu_s, memory=timed.memory,
        )
        if role == "loader":
            started = time.perf_counter()
            self._remember_recipes(node.id, outputs)
            block = ("loader: it builds models from local files; models travel as recipes, "
                     "so loaders run where their models are used")
            return replace(base, recipe_s=time.perf_counter() - started, offload_block=block)
        request = request_size(node, node_class, call.inputs, self.recipe_of)
        reply_bytes, reply_problem = reply_size(outputs)
        weights = naive_weight_files(self.workflow, self.registry, self.store, node.id)
        block = None
        if role == "output":
            block = "output node: it writes its results on this machine"
        elif local_files:
            block = f"{local_files[0]}: run it where the files are"
        elif reply_problem is not None:
            block = reply_problem
        elif request.problem is not None:
            no_recipe = "no recipe" in request.problem
            kind = "a model input has no recipe" if no_recipe else "an input cannot be sent"
            block = f"{kind}: {request.problem}"
        return replace(
            base, inputs=request.inputs, request_bytes=request.request_bytes, reply_bytes=reply_bytes,
            weight_bytes=weights.total_bytes, weight_files=weights.files, offload_block=block,
        )

    def _remember_recipes(self, node_id: str, outputs: Sequence[Any]) -> None:
        for index, value in enumerate(outputs):
            if is_model_value(value):
                recipe = self.recipe_for_output(node_id, index)
                if recipe is not None:
                    if not recipe.get("fingerprint"):
                        # as the remote runner does: the worker checks its rebuild against these weights
                        recipe = {**recipe, "fingerprint": fingerprint(value)}
                    with self._lock:
                        self._recipes[id(value)] = (value, recipe)


def device_description(memory: DeviceMemory | None = None) -> str:
    """Where local nodes run: the device ``memory`` places models on (None: the CPU, as loaded).

    The device really used, not the best one the machine has: a CPU run on a CUDA machine says cpu.
    """
    return device_label(memory)


def measure_workflow(
    workflow: Workflow,
    registry: NodeRegistry,
    store: ModelStore | None,
    recipe_for_output: RecipeForOutput,
    *,
    name: str,
    output_dir: Path,
    inputs_dir: Path | None = None,
    warmup_runs: int = 1,
    measured_runs: int = 1,
    statistic: Statistic = "median",
    cache: ExecutionCache | None = None,
    device: str = "cpu",
    device_memory: DeviceMemory | None = None,
) -> WorkflowMeasure:
    """Run ``workflow`` locally (after ``warmup_runs`` unmeasured runs) and measure every node.

    With ``measured_runs`` above 1, times are combined over the runs by ``statistic`` (median or
    minimum) and memory is the highest peak. ``device_memory``: run the compute nodes with their
    models placed there (``--device``/``--dtype``), as ``diffsplit run`` would; the memory probe
    then reads that device. A run's loaders build its own masters, so each run places its own
    copies and a node's time includes placing the models it is the first to use (as in a real
    run). Without it the models run as loaded and ``device`` says what the probe reads.
    """
    if measured_runs < 1:
        raise ValueError("measured_runs must be at least 1")
    executor = Executor(registry, store, inputs_dir=inputs_dir, output_dir=output_dir,
                        max_workers=max(2, len(workflow.nodes)))
    local = on_device(run_node_locally, device_memory)
    for _ in range(warmup_runs):
        executor.run(workflow, node_runner=LaneRunner(local, (), tuple(workflow.nodes)))
    probe_on = probe_device(device_memory) if device_memory is not None else device
    with MemoryProbe(device=probe_on) as probe:
        runs = [_measured_run(executor, workflow, registry, store, probe, recipe_for_output, cache, name,
                              device_memory)
                for _ in range(measured_runs)]
    stats = device_memory.stats() if device_memory is not None else None
    return replace(combine_measures(runs, statistic), warmup_runs=warmup_runs,
                   dtypes=dtype_names(device_memory), device_memory=stats)


def _measured_run(
    executor: Executor, workflow: Workflow, registry: NodeRegistry, store: ModelStore | None,
    probe: MemoryProbe, recipe_for_output: RecipeForOutput, cache: ExecutionCache | None, name: str,
    device_memory: DeviceMemory | None,
) -> WorkflowMeasure:
    runner = MeasuringRunner(workflow, registry, store, probe, recipe_for_output,
                             inner=on_device(run_node_locally, device_memory))
    lanes = LaneRunner(runner, (), tuple(workflow.nodes))
    started = time.perf_counter()
    result = executor.run(workflow, cache=cache, node_runner=lanes)
    total_s = time.perf_counter() - started
    measures = runner.measures
    nodes: list[NodeMeasure] = []
    for node_id, timing in result.timings.items():
        if node_id in measures:
            nodes.append(measures[node_id])
        elif timing.cache_hit:
            nodes.append(_cache_hit(workflow, registry, node_id, probe.kind))
    overhead = total_s - sum(t.wall_s for t in result.timings.values())
    return WorkflowMeasure(name=name, nodes=tuple(nodes), total_s=total_s, overhead_s=max(0.0, overhead),
                           device=device_description(device_memory))


def _cache_hit(workflow: Workflow, registry: NodeRegistry, node_id: str, memory_kind: Any) -> NodeMeasure:
    node = workflow.node(node_id)
    node_class = registry.get(node.class_type)
    role: Role = "loader" if node_class.is_loader else "output" if node_class.output_node else "compute"
    return NodeMeasure(
        node_id=node_id, class_type=node.class_type, title=node.title,
        dependencies=tuple(sorted(workflow.dependencies(node_id) & set(workflow.nodes))), role=role,
        cache_hit=True, wall_s=0.0, cpu_s=0.0, memory=MemoryMeasure(memory_kind, 0, 0),
        offload_block="cache hit: nothing to run",
    )
