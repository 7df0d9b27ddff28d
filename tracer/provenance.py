"""Provenance: the recorded history of every object a known loader produced.

Every loader result is a *root*. A mutator call joins the history of every
root that holds its subject (the subject's path in the root becomes the step's
``on``), and is also kept globally with the ids of everything its subject held,
so an explanation can tell when an object was changed through something its
root does not know about. After every recorded call the roots it touched get a
fresh :class:`~diffsplit.tracer.fingerprint.WeightSnapshot`, so in-place edits
made *between* known calls show up when a recipe is made.

Component swaps of a pipeline (``pipe.vae = other_vae``) are noticed before the
next recorded call starts and when a recipe is made; they join the history as
swap events. Events carry the index of the call they belong to, so a recipe
can be made *as of* an earlier call (a model passed as an argument is rebuilt
as it was when it was passed).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffsplit.tracer.calls import CallRecord
from diffsplit.tracer.fingerprint import WeightSnapshot
from diffsplit.tracer.objects import find_path, index_paths, is_pipeline
from diffsplit.tracer.recipe import join_path

#: "As of now": later than every recorded call.
NOW = sys.maxsize


class ObjectRef:
    """A reference to a traced object: weak where the type allows it, strong otherwise."""

    __slots__ = ("_strong", "_weak")

    def __init__(self, value: Any) -> None:
        try:
            self._weak: weakref.ReferenceType[Any] | None = weakref.ref(value)
            self._strong = None
        except TypeError:
            self._weak = None
            self._strong = value

    def get(self) -> Any:
        """The object, or None once it was garbage collected."""
        return self._weak() if self._weak is not None else self._strong


@dataclass(eq=False)
class HistoryEvent:
    """A mutation of a root's part at ``on``, or a swap of its component ``swap_name``."""

    index: int
    record: CallRecord | None
    on: str
    swap_name: str | None = None
    swap_value: ObjectRef | None = None
    swap_state: WeightSnapshot | None = None

    @property
    def scope(self) -> str:
        """The path of the part this event changes."""
        return join_path(self.on, self.swap_name) if self.swap_name else self.on


@dataclass(eq=False)
class Root:
    """A loader's result and everything recorded on it since."""

    record: CallRecord
    ref: ObjectRef
    history: list[HistoryEvent] = field(default_factory=list)
    snapshots: list[tuple[int, WeightSnapshot]] = field(default_factory=list)
    components: dict[str, ObjectRef | None] = field(default_factory=dict)
    failure: tuple[int, str] | None = None

    def snapshot_before(self, as_of: int) -> WeightSnapshot:
        """The last snapshot taken before call ``as_of`` (the loader's own one at least)."""
        found = self.snapshots[0][1]
        for index, snapshot in self.snapshots:
            if index < as_of:
                found = snapshot
        return found

    def events_before(self, as_of: int) -> list[HistoryEvent]:
        """History events of calls before ``as_of``."""
        return [event for event in self.history if event.index < as_of]


@dataclass(frozen=True, eq=False)
class Mutation:
    """A mutation, the ids of everything its subject held then, and the roots whose history has it."""

    record: CallRecord
    subject: ObjectRef
    affected: frozenset[int]
    roots: frozenset[int]


def _components(value: Any) -> dict[str, ObjectRef | None]:
    if not is_pipeline(value):
        return {}
    return {name: ObjectRef(part) if part is not None else None for name, part in value.components.items()}


class Provenance:
    """The roots and mutations of one trace; thread-safe.

    ``next_index`` hands out increasing call indexes (the session's counter);
    swap events take one when they are noticed.
    """

    def __init__(self, next_index: Callable[[], int]) -> None:
        self._next_index = next_index
        self._roots: list[Root] = []
        self._mutations: list[Mutation] = []
        self._lock = threading.RLock()

    @property
    def roots(self) -> tuple[Root, ...]:
        """The roots, in the order their loaders returned."""
        with self._lock:
            return tuple(self._roots)

    @property
    def mutations(self) -> tuple[Mutation, ...]:
        """Every recorded mutation, in the order they returned."""
        with self._lock:
            return tuple(self._mutations)

    def add_loader(self, record: CallRecord, result: Any) -> None:
        """A loader returned ``result`` (an object already traced, e.g. from a cache, keeps its history)."""
        if result is None:
            return
        with self._lock:
            if any(value is result for _, _, value in self._live_roots()):
                return
            root = Root(record, ObjectRef(result))
            self._refresh(root, result, record.index)
            self._roots.append(root)

    def add_mutation(self, record: CallRecord, subject: Any) -> None:
        """A mutator changed ``subject`` (and whatever it holds)."""
        with self._lock:
            holders = []
            for position, root, value in self._live_roots():
                path = find_path(value, subject)
                if path is not None:
                    root.history.append(HistoryEvent(record.index, record, path))
                    holders.append(position)
            affected = frozenset(index_paths(subject))
            self._mutations.append(Mutation(record, ObjectRef(subject), affected, frozenset(holders)))
            self._refresh_overlapping(subject, affected, record.index)

    def add_placement(self, record: CallRecord, subject: Any) -> None:
        """Tensors of ``subject`` moved (a device change): not part of identity, but snapshots renew."""
        with self._lock:
            self._refresh_overlapping(subject, frozenset(index_paths(subject)), record.index)

    def add_failure(self, record: CallRecord, subject: Any) -> None:
        """A mutator raised part-way: whatever holds ``subject`` is in an unknown state from then on."""
        with self._lock:
            for _, root, value in self._live_roots():
                if root.failure is None and find_path(value, subject) is not None:
                    root.failure = (record.index, f"{record.label} raised while changing it")

    def note_swaps(self) -> None:
        """Record pipeline components replaced since the last look (call before each recorded call)."""
        with self._lock:
            for _, root, value in self._live_roots():
                self._note_swaps(root, value)

    def position(self, root: Root) -> int:
        """The index of ``root`` in :attr:`roots`."""
        with self._lock:
            return self._roots.index(root)

    def _live_roots(self) -> list[tuple[int, Root, Any]]:
        live = []
        for position, root in enumerate(self._roots):
            value = root.ref.get()
            if value is not None:
                live.append((position, root, value))
        return live

    def _refresh(self, root: Root, value: Any, index: int) -> None:
        root.snapshots.append((index, WeightSnapshot.take(value)))
        root.components = _components(value)

    def _refresh_overlapping(self, subject: Any, affected: frozenset[int], index: int) -> None:
        for _, root, value in self._live_roots():
            if id(value) in affected or find_path(value, subject) is not None:
                self._note_swaps(root, value)
                self._refresh(root, value, index)

    def _note_swaps(self, root: Root, value: Any) -> None:
        """Swap events for replaced components; the snapshot takes the new component's tensors."""
        current = _components(value)
        for name, now in current.items():
            before = root.components.get(name)
            now_value = now.get() if now is not None else None
            before_value = before.get() if before is not None else None
            if now_value is not before_value:
                index = self._next_index()
                part = WeightSnapshot.take(now_value) if now_value is not None else WeightSnapshot({})
                root.history.append(HistoryEvent(index, None, "", name, now, part))
                root.snapshots.append((index, root.snapshot_before(index).with_part(name, part)))
        root.components = current
