"""Running a workflow: which nodes run, in what order, on which threads, with what cache.

ComfyUI semantics: the nodes that run are the *targets* (by default the output
nodes, e.g. SaveImage) and their ancestors; other nodes are skipped. With an
:class:`ExecutionCache`, a node whose signature is cached is not run and neither
are ancestors needed only by it. Output nodes always run (they save files).

Concurrency: nodes whose inputs are ready run on a thread pool of
``max_workers`` threads (default 2). Results do not depend on timing: each node
sees exactly its inputs, and results are reported in topological order. Use
``max_workers=1`` to run one node at a time in topological order (node
functions that are not thread-safe, or reproducible progress output).

The seam for offloading: ``run(..., node_runner=...)``. A :data:`NodeRunner`
receives a :class:`NodeCall` (node, class, resolved inputs, context, workflow)
and returns the node's outputs; :func:`run_node_locally` is the default. A remote
runner sends labelled nodes to a worker and delegates the rest to the default.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsplit.engine.dtypes import DtypePolicy
from diffsplit.engine.errors import EngineError, Interrupted, NodeFailed, WorkflowError
from diffsplit.engine.execution_cache import ExecutionCache, node_signatures
from diffsplit.engine.execution_context import ImageSaver, ProgressCallback, RunContext
from diffsplit.engine.graph import Link, Node, Workflow, node_sort_key
from diffsplit.engine.layout import contiguous_value
from diffsplit.engine.nodes.base import NodeClass, NodeContext
from diffsplit.engine.nodes.prompt_embeddings import embedding_stamp
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.sampling.condition_scales import ChainDecision, ConditionLog, ConditionSettings
from diffsplit.engine.store import ModelStore, path_inside
from diffsplit.engine.validation import required_class, validate_workflow

log = logging.getLogger(__name__)
#: How often stopping nodes are checked after Ctrl-C.
_STOP_POLL_S = 0.2


@dataclass(frozen=True)
class NodeCall:
    """Everything needed to execute one node."""

    node: Node
    node_class: NodeClass
    inputs: Mapping[str, Any]
    context: NodeContext
    workflow: Workflow


#: Executes one node and returns its outputs (one per declared output).
NodeRunner = Callable[[NodeCall], Sequence[Any]]


def run_node_locally(call: NodeCall) -> Sequence[Any]:
    """The default runner: call the node class's function in this process.

    Deferred loader outputs among the inputs (``engine.lazy_models``) are built first.
    """
    from diffsplit.engine.lazy_models import materialised_inputs

    return call.node_class.function(call.context, **materialised_inputs(call.inputs))


@dataclass(frozen=True)
class NodeTiming:
    """Wall time of one node in a run (0.0 for cache hits)."""

    wall_s: float
    cache_hit: bool


@dataclass(frozen=True)
class RunResult:
    """What one run produced.

    ``outputs``: per node id (run or cache hit), its output tuple. ``saved_files``:
    images written, in topological order of the nodes that wrote them. ``timings``:
    per node id. ``executed``: ids of the nodes that actually ran, in topological order.
    """

    outputs: Mapping[str, tuple[Any, ...]]
    saved_files: tuple[Path, ...]
    timings: Mapping[str, NodeTiming]
    executed: tuple[str, ...]
    #: what ``--conditions auto`` decided, per sampler chain (empty when off)
    conditions: tuple[ChainDecision, ...] = ()


@dataclass(frozen=True)
class _Completed:
    outputs: tuple[Any, ...]
    wall_s: float
    saved: tuple[Path, ...]


class Executor:
    """Runs workflows against a node registry and a model store."""

    def __init__(
        self,
        registry: NodeRegistry,
        store: ModelStore | None,
        *,
        inputs_dir: Path | None = None,
        output_dir: Path,
        temp_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        max_workers: int = 2,
        master_dtypes: DtypePolicy | None = None,
        conditions: ConditionSettings | None = None,
    ) -> None:
        """``master_dtypes``: loaders keep a model in its kind's dtype where its file stores it so
        (a run computing in fp16 on a device: an fp16 file is not doubled to fp32 here).
        ``conditions``: samplers prune and rescale their ControlNet conditions after a probe
        (``engine.sampling.condition_scales``; ``--conditions auto``)."""
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.master_dtypes = master_dtypes
        self.conditions = conditions
        self.registry = registry
        self.store = store
        self.inputs_dir = inputs_dir
        self.output_dir = Path(output_dir)
        self.temp_dir = Path(temp_dir) if temp_dir is not None else self.output_dir / "temp"
        self.progress = progress
        self.max_workers = max_workers
        self._saver = ImageSaver()

    def run(
        self,
        workflow: Workflow,
        *,
        cache: ExecutionCache | None = None,
        targets: Iterable[str] | None = None,
        given: Mapping[str, Sequence[Any]] | None = None,
        node_runner: NodeRunner = run_node_locally,
        cancel: threading.Event | None = None,
    ) -> RunResult:
        """Validate and run ``workflow``; raises WorkflowError before running, NodeFailed while.

        ``targets``: node ids to produce (default: the output nodes). ``given``:
        outputs of nodes supplied by the caller (a worker running a sub-workflow
        passes the tensors it received); those nodes are not run or validated.
        ``cancel``: set from another thread, it stops the run as a Ctrl-C in this one
        does (running nodes stop at their next step; Interrupted is raised).
        """
        for node in workflow.nodes.values():
            required_class(self.registry, node)
        wanted = tuple(targets) if targets is not None else workflow.output_node_ids(self.registry)
        if not wanted:
            raise WorkflowError("the workflow has no output nodes (such as SaveImage); nothing to run")
        supplied = self._supplied_outputs(workflow, given or {})
        needed = workflow.needed_for(wanted)
        order = workflow.restricted_to(needed).topological_order()
        uncacheable = {*supplied, *self._pruning_samplers(workflow, order)}
        signatures = node_signatures(workflow, order, uncacheable=uncacheable, file_stamp=self._file_stamp)
        to_run, hits = self._plan(workflow, wanted, supplied, signatures, cache)
        validate_workflow(workflow, self.registry, self.store, only=to_run)
        log = None if self.conditions is None else ConditionLog(self.conditions)
        completed = self._execute(workflow, to_run, {**supplied, **hits}, signatures, cache, node_runner,
                                  cancel or threading.Event(), log)
        outputs: dict[str, tuple[Any, ...]] = {}
        timings: dict[str, NodeTiming] = {}
        for node_id in order:
            if node_id in completed:
                outputs[node_id] = completed[node_id].outputs
                timings[node_id] = NodeTiming(wall_s=completed[node_id].wall_s, cache_hit=False)
            elif node_id in hits:
                outputs[node_id] = hits[node_id]
                timings[node_id] = NodeTiming(wall_s=0.0, cache_hit=True)
        ran = tuple(node_id for node_id in order if node_id in completed)
        return RunResult(
            outputs=outputs,
            saved_files=tuple(path for node_id in ran for path in completed[node_id].saved),
            timings=timings,
            executed=ran,
            conditions=() if log is None else tuple(log.snapshot()),
        )

    def _pruning_samplers(self, workflow: Workflow, order: Sequence[str]) -> list[str]:
        """The samplers that run the conditioning scale estimator in this run: never cached, so a
        pruned run never takes an unpruned result (or the reverse) and always has its decisions."""
        if self.conditions is None:
            return []
        return [node_id for node_id in order
                if self.registry.get(workflow.nodes[node_id].class_type).prunes_conditions]

    def _file_stamp(self, node: Node, name: str, value: Any) -> str | None:
        """Path, size and mtime of a model or input file named by a literal input (None otherwise).

        A prompt's ``embedding:`` names count as the files they name.
        """
        node_class = self.registry.get(node.class_type)
        spec = node_class.input(name)
        if spec is not None and spec.type == "STRING" and isinstance(value, str) and self.store is not None:
            return embedding_stamp(node_class, value, self.store.resolve)
        if spec is None or spec.type != "COMBO" or not isinstance(value, str) or spec.choices is not None:
            return None
        try:
            if spec.model_folder:
                path = self.store.resolve(spec.model_folder, value) if self.store is not None else None
            else:  # a COMBO of input files (LoadImage, LoadImageMask)
                path = path_inside(self.inputs_dir, value) if self.inputs_dir is not None else None
            if path is None:
                return None
            info = path.stat()
        except (OSError, ValueError, EngineError):
            return "missing"
        return f"{path}:{info.st_size}:{info.st_mtime_ns}"

    def _supplied_outputs(
        self, workflow: Workflow, given: Mapping[str, Sequence[Any]]
    ) -> dict[str, tuple[Any, ...]]:
        supplied: dict[str, tuple[Any, ...]] = {}
        for node_id, outputs in given.items():
            node = workflow.node(node_id)
            expected = len(required_class(self.registry, node).outputs)
            if len(outputs) != expected:
                raise WorkflowError(
                    f"given {len(outputs)} output value(s), the class has {expected}",
                    node_id=node_id,
                    class_type=node.class_type,
                )
            supplied[node_id] = tuple(outputs)
        return supplied

    def _plan(
        self,
        workflow: Workflow,
        targets: Sequence[str],
        supplied: Mapping[str, tuple[Any, ...]],
        signatures: Mapping[str, str | None],
        cache: ExecutionCache | None,
    ) -> tuple[set[str], dict[str, tuple[Any, ...]]]:
        """The nodes to run and the cache hits, walking back from the targets."""
        to_run: set[str] = set()
        hits: dict[str, tuple[Any, ...]] = {}
        pending = list(targets)
        while pending:
            node_id = pending.pop()
            if node_id in to_run or node_id in hits or node_id in supplied or node_id not in workflow.nodes:
                continue
            signature = signatures.get(node_id)
            cached = None
            if cache is not None and signature is not None and not self._is_output(workflow, node_id):
                cached = cache.get(signature)
            if cached is not None:
                hits[node_id] = cached
                continue
            to_run.add(node_id)
            pending.extend(workflow.dependencies(node_id))
        return to_run, hits

    def _execute(
        self,
        workflow: Workflow,
        to_run: set[str],
        available: dict[str, tuple[Any, ...]],
        signatures: Mapping[str, str | None],
        cache: ExecutionCache | None,
        node_runner: NodeRunner,
        cancel: threading.Event,
        conditions: ConditionLog | None = None,
    ) -> dict[str, _Completed]:
        """Run ``to_run`` as inputs become ready; the first failure stops new submissions.

        Ctrl-C (KeyboardInterrupt in this thread) sets the run's cancel event:
        running nodes stop at their next step (remote ones are cancelled on
        their worker), and once they have, Interrupted is raised; a second
        Ctrl-C while they stop does not abandon them.
        """
        schedule = _Schedule.start(workflow, to_run, available)
        schedule.conditions = conditions
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="diffsplit-node") as pool:
            try:
                failure = self._drive(schedule, signatures, cache, node_runner, pool, cancel)
            except KeyboardInterrupt:
                cancel.set()
                _wait_for_running(schedule.running)
                raise Interrupted() from None
        if failure is not None:
            raise failure
        return schedule.completed

    def _drive(
        self,
        schedule: _Schedule,
        signatures: Mapping[str, str | None],
        cache: ExecutionCache | None,
        node_runner: NodeRunner,
        pool: ThreadPoolExecutor,
        cancel: threading.Event,
    ) -> NodeFailed | None:
        """Submit ready nodes and collect finished ones until nothing runs; the first failure."""
        workflow, running = schedule.workflow, schedule.running
        failure: NodeFailed | None = None
        while running or (schedule.ready and failure is None and not cancel.is_set()):
            while (schedule.ready and failure is None and not cancel.is_set()
                   and len(running) < self.max_workers):
                _, node_id = heapq.heappop(schedule.ready)
                call, context = self._call(workflow, workflow.nodes[node_id], schedule.values, cancel,
                                           schedule.conditions)
                running[pool.submit(self._run_one, call, context, node_runner)] = node_id
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: node_sort_key(running[f])):
                node_id = running.pop(future)
                try:
                    result = future.result()
                except NodeFailed as exc:
                    failure = failure or exc
                    continue
                signature = signatures.get(node_id)
                if cache is not None and signature is not None and not self._is_output(workflow, node_id):
                    cache.put(signature, result.outputs)
                schedule.finished(node_id, result)
        if failure is None and cancel.is_set() and schedule.ready:
            raise Interrupted()  # cancelled from outside between nodes: the rest never started
        return failure

    def _is_output(self, workflow: Workflow, node_id: str) -> bool:
        return self.registry[workflow.nodes[node_id].class_type].output_node

    def _call(
        self, workflow: Workflow, node: Node, values: Mapping[str, tuple[Any, ...]], cancel: threading.Event,
        conditions: ConditionLog | None = None,
    ) -> tuple[NodeCall, RunContext]:
        inputs = {
            name: values[value.node_id][value.output_index] if isinstance(value, Link) else value
            for name, value in node.inputs.items()
        }
        context = RunContext(
            node.id,
            store=self.store,
            inputs_dir=self.inputs_dir,
            output_dir=self.output_dir,
            temp_dir=self.temp_dir,
            progress=self.progress,
            saver=self._saver,
            workflow=workflow,
            cancel=cancel,
            master_dtypes=self.master_dtypes,
            conditions=conditions,
        )
        return NodeCall(node, self.registry[node.class_type], inputs, context, workflow), context

    @staticmethod
    def _run_one(call: NodeCall, context: RunContext, node_runner: NodeRunner) -> _Completed:
        node, node_class = call.node, call.node_class
        started = time.perf_counter()
        try:
            outputs = node_runner(call)
        except (NodeFailed, Interrupted):
            raise
        except Exception as exc:
            raise NodeFailed(node.id, node_class.name, f"{type(exc).__name__}: {exc}") from exc
        wall_s = time.perf_counter() - started
        if outputs is None and not node_class.outputs:
            outputs = ()
        if not isinstance(outputs, tuple | list) or len(outputs) != len(node_class.outputs):
            got = f"{len(outputs)} value(s)" if isinstance(outputs, tuple | list) else type(outputs).__name__
            raise NodeFailed(
                node.id, node_class.name, f"returned {got}; expected a tuple of {len(node_class.outputs)}"
            )
        memo: dict[int, Any] = {}  # one layout for every output (what the wire delivers), aliasing kept
        outputs = tuple(contiguous_value(output, memo) for output in outputs)
        return _Completed(outputs, wall_s, tuple(context.saved))


@dataclass
class _Schedule:
    """The state of one run: what is ready, running, waiting for inputs, and done."""

    workflow: Workflow
    to_run: set[str]
    values: dict[str, tuple[Any, ...]]
    waiting: dict[str, int]
    ready: list[tuple[Any, str]]
    consumers: Mapping[str, frozenset[str]]
    running: dict[Future[_Completed], str] = field(default_factory=dict)
    completed: dict[str, _Completed] = field(default_factory=dict)
    #: the conditioning scale estimator's decisions of this run (``--conditions auto``), or None
    conditions: ConditionLog | None = None

    @classmethod
    def start(
        cls, workflow: Workflow, to_run: set[str], available: Mapping[str, tuple[Any, ...]]
    ) -> _Schedule:
        """The schedule before anything ran: nodes with no inputs to wait for are ready."""
        waiting = {node_id: len(workflow.dependencies(node_id) & to_run) for node_id in to_run}
        ready = [(node_sort_key(node_id), node_id) for node_id, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        return cls(workflow, to_run, dict(available), waiting, ready, workflow.dependents())

    def finished(self, node_id: str, result: _Completed) -> None:
        """Record a node's outputs and make the consumers whose inputs are now all there ready."""
        self.completed[node_id] = result
        self.values[node_id] = result.outputs
        for consumer in self.consumers[node_id] & self.to_run:
            self.waiting[consumer] -= 1
            if self.waiting[consumer] == 0:
                heapq.heappush(self.ready, (node_sort_key(consumer), consumer))


def _wait_for_running(running: Mapping[Future[Any], str]) -> None:
    """Wait until every running node has stopped; a second Ctrl-C meanwhile does not abandon them."""
    pending = set(running)
    while pending:
        try:
            _, pending = wait(pending, timeout=_STOP_POLL_S)
        except KeyboardInterrupt:
            log.warning("still stopping: waiting for %d node(s) to reach their next step", len(pending))
