"""Explaining an object: the recipe that rebuilds it, or the reason there is none.

Each live root that holds the object is a *candidate* (root recipe + the
object's path as ``select``). A candidate is *complete* when no mutation made
after its root touched the object without being in the root's history
(``pipe.load_lora_weights`` changes a UNet that was loaded on its own and
passed in: only the pipeline's recipe includes the LoRA). Complete candidates
are tried with the fewest changes to replay first; a candidate is refused when
the object's tensors differ from the snapshot taken after the root's last
known call (edited, replaced, added or removed by hand) or when a mutator
raised on it.

A model passed as an argument (``from_pretrained(vae=vae)``, a graph loader's
``model`` input) becomes a nested recipe made *as of* that call: only roots,
events and mutations recorded before it count, and the argument's tensors as
captured when the call started are compared with the root's snapshot then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffsplit.tracer.calls import CallRecord, LocalFile, ValueEncoder, to_step
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.fingerprint import WeightSnapshot, fingerprint, summarize_changes
from diffsplit.tracer.objects import describe, find_path, is_pipeline
from diffsplit.tracer.pipeline_folders import component_steps, narrowed_to_component
from diffsplit.tracer.provenance import NOW, HistoryEvent, Mutation, Provenance, Root
from diffsplit.tracer.recipe import FileRef, Recipe, Step, paths_overlap, recipe_value, split_path

#: Nested recipes deeper than this are refused (a pathological program).
MAX_NESTING = 16
_LOSSLESS_WIDENING = frozenset({torch.float32, torch.float64})


@dataclass(frozen=True)
class Candidate:
    """One way to explain ``target``: a root and the target's path in it."""

    root: Root
    path: str
    target: Any
    events: tuple[HistoryEvent, ...]


@dataclass
class Explainer:
    """Makes recipes from a :class:`Provenance` as of one moment (``NOW`` or a past call)."""

    provenance: Provenance
    file_ref: Callable[[Path, tuple[Path, ...]], FileRef]
    as_of: int = NOW
    state: WeightSnapshot | None = None
    depth: int = 0

    def recipe(self, value: Any, *, name: str | None = None) -> Recipe:
        """The recipe that rebuilds ``value``; NotOffloadable naming it and the reason otherwise."""
        label = name or describe(value)
        if self.depth > MAX_NESTING:
            raise NotOffloadable(label, "its recipe nests too deeply")
        if self.as_of == NOW:
            self.provenance.note_swaps()
        candidates = self._candidates(value)
        if not candidates:
            raise NotOffloadable(
                label,
                "no known loader produced it and it is not part of anything one produced "
                "(built by hand, or loaded by a function diffsplit does not know: "
                "mark such a function with @diffsplit.loader)",
            )
        complete: list[Candidate] = []
        missing: Mutation | None = None
        for candidate in candidates:
            mutation = self._missing_mutation(candidate)
            if mutation is None:
                complete.append(candidate)
            else:
                missing = missing or mutation
        if not complete:
            assert missing is not None
            raise NotOffloadable(
                label,
                f"{missing.record.label} changed it through an object whose own origin is unknown, "
                "so no recipe includes that change",
            )
        complete.sort(key=_rank)
        first_refusal: NotOffloadable | None = None
        for candidate in complete:
            try:
                return self._recipe_of(candidate, label)
            except NotOffloadable as refusal:
                first_refusal = first_refusal or refusal
        assert first_refusal is not None
        raise first_refusal

    def _candidates(self, value: Any) -> list[Candidate]:
        found = []
        for root in reversed(self.provenance.roots):
            root_value = root.ref.get()
            if root_value is None or root.record.index >= self.as_of:
                continue
            path = find_path(root_value, value)
            if path is not None:
                events = tuple(e for e in root.events_before(self.as_of) if paths_overlap(e.scope, path))
                found.append(Candidate(root, path, value, events))
        return found

    def _missing_mutation(self, candidate: Candidate) -> Mutation | None:
        """A mutation that touched the target after its root was made but is not in the root's history."""
        position = self.provenance.position(candidate.root)
        for mutation in self.provenance.mutations:
            index = mutation.record.index
            if position in mutation.roots or not candidate.root.record.index < index < self.as_of:
                continue
            subject = mutation.subject.get()
            if id(candidate.target) in mutation.affected or (
                subject is not None and find_path(candidate.target, subject) is not None
            ):
                return mutation
        return None

    def _recipe_of(self, candidate: Candidate, label: str) -> Recipe:
        root = candidate.root
        where = f"{label} at {candidate.path}" if candidate.path else label
        if root.failure is not None and root.failure[0] < self.as_of:
            raise NotOffloadable(where, root.failure[1])
        baseline = root.snapshot_before(self.as_of)
        if self.as_of == NOW:
            findings = baseline.changes(candidate.target, at=candidate.path)
        elif self.state is not None:
            findings = baseline.compare(self.state, at=candidate.path)
        else:
            findings = []
        if findings:
            raise NotOffloadable(
                where,
                "weights changed after loading, outside any known loader or mutator: "
                + summarize_changes(findings),
            )
        steps = [to_step(root.record, _Encoder(self, root.record), on=None)]
        for event in _drop_round_trips(list(candidate.events)):
            steps.append(self._event_step(event, where))
        recipe = Recipe(steps=tuple(steps), select=candidate.path, fingerprint=fingerprint(candidate.target))
        pipeline = root.ref.get()
        if isinstance(root.record.file, LocalFile) and is_pipeline(pipeline):
            recipe = narrowed_to_component(component_steps(recipe, pipeline), root.record.file.path)
        return recipe

    def _event_step(self, event: HistoryEvent, where: str) -> Step:
        if event.record is not None:
            return to_step(event.record, _Encoder(self, event.record), on=event.on)
        new = event.swap_value.get() if event.swap_value is not None else None
        if event.swap_value is not None and new is None:
            raise NotOffloadable(
                where, f"component {event.swap_name!r} was replaced by an object that is gone"
            )
        value = None
        if new is not None:
            nested = Explainer(self.provenance, self.file_ref, event.index, event.swap_state, self.depth + 1)
            value = recipe_value(replace(nested.recipe(new), fingerprint=None))
        return Step(op="set", on=event.on, kwargs={"name": event.swap_name, "value": value})


@dataclass
class _Encoder(ValueEncoder):
    """Encodes the arguments of one recorded call: nested recipes are made as of that call."""

    explainer: Explainer
    record: CallRecord

    def file_ref(self, path: Path, read: tuple[Path, ...] = ()) -> FileRef:
        return self.explainer.file_ref(path, read)

    def nested_recipe(self, value: Any) -> Recipe:
        """The recipe of a model argument as it was passed, with no fingerprint (the outer one covers it)."""
        state = self.record.argument_states.get(id(value))
        outer = self.explainer
        inner = Explainer(outer.provenance, outer.file_ref, self.record.index, state, outer.depth + 1)
        return replace(inner.recipe(value), fingerprint=None)


def _rank(candidate: Candidate) -> tuple[int, int, int]:
    """Fewest changes to replay first, then the shortest path, then the latest root."""
    return (len(candidate.events), len(split_path(candidate.path)), -candidate.root.record.index)


def _is_round_trip(previous: HistoryEvent, event: HistoryEvent) -> bool:
    first, second = previous.record, event.record
    if first is None or second is None or first.op != "torch.to" or second.op != "torch.to":
        return False
    widened = first.kwargs.get("dtype")
    return (
        event.on == previous.on
        and first.from_dtype is not None
        and widened in _LOSSLESS_WIDENING
        and second.kwargs.get("dtype") == first.from_dtype
        and first.from_dtype.itemsize < widened.itemsize
    )


def _drop_round_trips(events: list[HistoryEvent]) -> list[HistoryEvent]:
    """Drop lossless dtype round trips (float16 → float32 → float16 on one part), e.g. a VAE upcast."""
    kept: list[HistoryEvent] = []
    for event in events:
        if kept and _is_round_trip(kept[-1], event):
            kept.pop()
            continue
        kept.append(event)
    return kept
