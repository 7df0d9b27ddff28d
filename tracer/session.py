"""Tracing sessions: ``with tracing() as trace:`` records a run; ``trace.recipe(obj)`` explains it.

A :class:`Session` receives the recorder's calls: loaders become provenance
roots, mutators join their histories, placements renew weight snapshots, and
``@node`` steps get their inputs categorized and explained (with the torch
modules they ran). A :class:`Trace` is the user's view of a session; it stays
usable after the ``with`` block ends.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from diffsplit.tracer.calls import CallRecord, LocalFile, record_from_call
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.explain import Explainer
from diffsplit.tracer.file_reads import ReadBlock
from diffsplit.tracer.files import FileRefResolver, file_refs_for
from diffsplit.tracer.inputs import InputExplanation, ModuleUse, explain_input, with_used_parts
from diffsplit.tracer.known_loaders import (
    ResolvedFunction,
    classify_call,
    resolve_known_functions,
    resolve_native_readers,
)
from diffsplit.tracer.objects import describe
from diffsplit.tracer.owned_memory import own_weights
from diffsplit.tracer.provenance import Provenance
from diffsplit.tracer.recipe import Recipe
from diffsplit.tracer.recorder import CallRecorder
from diffsplit.tracer.report import input_lines


@dataclass(frozen=True)
class StepCall:
    """One call of a ``@node`` step seen in a trace."""

    index: int
    name: str
    remote: str | None
    inputs: tuple[InputExplanation, ...]
    raised: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "index": self.index,
            "name": self.name,
            "remote": self.remote,
            "raised": self.raised,
            "inputs": [item.to_dict() for item in self.inputs],
        }


@dataclass(frozen=True)
class _PendingCall:
    record: CallRecord
    subject: Any
    reads: ReadBlock | None = None


@dataclass
class _PendingStep:
    index: int
    name: str
    remote: str | None
    values: dict[str, Any]
    inputs: tuple[InputExplanation, ...]
    use: ModuleUse


def _reads_folder(record: CallRecord) -> bool:
    """Whether a recorded call reads a folder (whose files read its recipe names): a loader's model
    folder, or a mutator's (a LoRA folder or hub repository with ``weight_name=``)."""
    return record.kind != "placement" and isinstance(record.file, LocalFile) and record.file.path.is_dir()


class Session:
    """The listener behind a trace: provenance of objects, recorded calls and steps."""

    def __init__(
        self, files: FileRefResolver, *, model_types: tuple[type, ...] = (), offload_nodes: bool = False
    ) -> None:
        self.files = files
        self.model_types = tuple(model_types)
        #: whether ``@node(remote=...)`` steps run on their worker (False: a full local run)
        self.offload_nodes = offload_nodes
        self._calls: list[CallRecord] = []
        self._steps: list[StepCall] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self.provenance = Provenance(self.next_index)

    @property
    def calls(self) -> tuple[CallRecord, ...]:
        """Loader and mutator calls that returned, in the order they began."""
        with self._lock:
            return tuple(sorted(self._calls, key=lambda record: record.index))

    @property
    def steps(self) -> tuple[StepCall, ...]:
        """``@node`` step calls, in the order they began."""
        with self._lock:
            return tuple(sorted(self._steps, key=lambda step: step.index))

    def next_index(self) -> int:
        """A fresh, increasing call index."""
        with self._lock:
            return next(self._counter)

    def make_recipe(self, value: Any, name: str | None = None) -> Recipe:
        """The recipe of ``value``; NotOffloadable otherwise."""
        return Explainer(self.provenance, self.files.file_ref).recipe(value, name=name)

    def record_call(self, record: CallRecord, subject: Any, result: Any) -> None:
        """Add a returned call to the provenance (also used by the workflow tracer).

        A loader's result and a mutator's subject get owned weights first
        (:func:`~diffsplit.tracer.owned_memory.own_weights`): a model mapped
        from its file computes alignment-dependent results on some CPUs, and
        the worker's rebuild does the same, so split equals local anywhere.
        """
        if record.kind == "loader":
            own_weights(result)
        elif record.kind == "mutator":
            own_weights(subject)
        if record.kind == "loader":
            self.provenance.add_loader(record, result)
        elif record.kind == "mutator":
            self.provenance.add_mutation(record, subject)
        else:
            self.provenance.add_placement(record, subject)
        if record.kind != "placement":
            with self._lock:
                self._calls.append(record)

    # CallListener

    def call_started(self, function: ResolvedFunction, arguments: dict[str, Any]) -> object | None:
        """A watched call began (see :class:`~diffsplit.tracer.recorder.CallListener`)."""
        if function.role == "node":
            return self._step_started(arguments)
        classified = classify_call(function, arguments)
        if classified is None:
            return None
        kind, extra = classified
        self.provenance.note_swaps()
        record = record_from_call(self.next_index(), function, arguments, kind, extra)
        subject_param = function.spec.subject_param
        reads = ReadBlock().start() if _reads_folder(record) else None
        return _PendingCall(record, arguments.get(subject_param) if subject_param else None, reads)

    def call_finished(self, token: object, result: Any, raised: bool) -> None:
        """A watched call returned or raised."""
        if isinstance(token, _PendingStep):
            self._step_finished(token, raised)
            return
        assert isinstance(token, _PendingCall)
        if token.reads is not None:
            read = token.reads.stop()
            if not raised and isinstance(token.record.file, LocalFile):
                files_read = read.inside(token.record.file.path)
                token = replace(token, record=replace(token.record, files_read=files_read))
        if raised:
            if token.record.kind == "mutator":
                self.provenance.add_failure(token.record, token.subject)
            return
        self.record_call(token.record, token.subject, result)

    def _step_started(self, arguments: dict[str, Any]) -> _PendingStep:
        marked = arguments["marked"]
        function = marked.__wrapped__
        name = getattr(function, "__qualname__", describe(function))
        try:
            bound = inspect.signature(function).bind(*arguments["args"], **arguments["kwargs"])
            values = dict(bound.arguments)
        except TypeError:
            values = {f"arg{i}": value for i, value in enumerate(arguments["args"])} | dict(
                arguments["kwargs"]
            )
        values.pop("self", None)  # a marked method's instance is not an input
        inputs = tuple(
            explain_input(key, value, self.make_recipe, where=name, model_types=self.model_types)
            for key, value in values.items()
        )
        use = ModuleUse().__enter__()
        return _PendingStep(self.next_index(), name, getattr(marked, "remote", None), values, inputs, use)

    def _step_finished(self, pending: _PendingStep, raised: bool) -> None:
        pending.use.close()
        inputs = tuple(
            with_used_parts(item, pending.values[item.name], pending.use.called) for item in pending.inputs
        )
        step = StepCall(pending.index, pending.name, pending.remote, inputs, raised)
        with self._lock:
            self._steps.append(step)


class Trace:
    """What a traced run recorded; usable during and after the run."""

    def __init__(self, session: Session, recorder: CallRecorder | None = None) -> None:
        self._session = session
        self._recorder = recorder
        self.result: Any = None

    @property
    def calls(self) -> tuple[CallRecord, ...]:
        """Every loader and mutator call seen, in order."""
        return self._session.calls

    @property
    def steps(self) -> tuple[StepCall, ...]:
        """Every ``@node`` step call seen, in order."""
        return self._session.steps

    @property
    def errors(self) -> tuple[str, ...]:
        """Failures of the tracer itself while recording (the traced code never sees them)."""
        return tuple(self._recorder.errors) if self._recorder is not None else ()

    def recipe(self, value: Any, *, name: str | None = None) -> Recipe:
        """The recipe that rebuilds ``value``; raises NotOffloadable naming it and the reason."""
        return self._session.make_recipe(value, name)

    def explain(self, value: Any, *, name: str | None = None) -> Recipe | NotOffloadable:
        """Like :meth:`recipe`, but returns the refusal instead of raising it."""
        try:
            return self.recipe(value, name=name)
        except NotOffloadable as refusal:
            return refusal

    def report(self) -> str:
        """Every loader call seen, what each loaded object depends on, and every step's inputs."""
        lines = [f"diffsplit trace: {len(self.calls)} loader/mutator call(s), {len(self.steps)} step call(s)"]
        lines.append("calls:")
        lines.extend(f"  #{record.index} {record.summary()}" for record in self.calls)
        lines.append("objects:")
        for root in self._session.provenance.roots:
            value = root.ref.get()
            if value is None:
                continue
            history = ", ".join(f"#{event.record.index}" for event in root.history if event.record)
            lines.append(
                f"  {describe(value)} ← #{root.record.index}" + (f" then {history}" if history else "")
            )
        if self.steps:
            lines.append("steps:")
        for step in self.steps:
            lines.append(f"  {step.name}" + (f" (remote {step.remote})" if step.remote else ""))
            lines.extend(f"    {line}" for item in step.inputs for line in input_lines(step.name, item))
        lines.extend(f"tracer error: {error.splitlines()[0]}" for error in self.errors)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: calls (as text) and steps (with recipes)."""
        return {
            "calls": [{"index": record.index, "call": record.summary()} for record in self.calls],
            "steps": [step.to_dict() for step in self.steps],
            "errors": list(self.errors),
        }


@contextmanager
def tracing(
    *,
    store: Any | None = None,
    model_types: tuple[type, ...] = (),
    pause_in_module_calls: bool = True,
    offload_nodes: bool = False,
) -> Iterator[Trace]:
    """Record loader calls, mutators and ``@node`` steps run inside the block.

    ``store`` (the engine's ModelStore) names files by their store folder and
    name; without one, files are hashed and named by their file name.
    ``model_types`` adds classes whose instances are models. With
    ``offload_nodes``, ``@node(remote=...)`` steps run on their worker (their
    model inputs travel as this trace's recipes); without, the block is a full
    local run.
    """
    session = Session(file_refs_for(store), model_types=model_types, offload_nodes=offload_nodes)
    recorder = CallRecorder(resolve_known_functions(), session, pause_in_module_calls=pause_in_module_calls,
                            readers=resolve_native_readers())
    recorded = Trace(session, recorder)
    with recorder:
        yield recorded


def trace(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Trace:
    """Run ``function(*args, **kwargs)`` traced; the Trace holds its return value in ``.result``."""
    with tracing() as recorded:
        recorded.result = function(*args, **kwargs)
    return recorded
