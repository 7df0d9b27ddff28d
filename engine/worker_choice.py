"""Which of a node's workers to try first: the one that holds its models, else the least loaded.

An assignment may list several workers (``engine.remote_assign``). Before a
node goes out, the client asks each candidate's ``status`` (a short timeout,
all at once) and orders them:

1. workers with a free slot before those where the node would wait (every slot
   taken): an idle worker builds the models once rather than leave the node
   queued behind a busy holder (a batch's second worker gets used);
2. among those, workers that hold more of the node's models first: a worker's ``status``
   lists its cached models by *build key* (``remote.cache.CachedModel.digest``,
   the key ``remote.builder.CachedBuilder`` caches a build under), which is
   ``engine.rebuild.build_key`` of the recipe the client sends in a
   ``$ds:model`` input (or a ControlNet hint): sha256 of the recipe's version and
   steps, leaving out ``select`` and ``fingerprint``, plus the selected output
   where the loader builds it alone (the UNet, CLIP and VAE of one checkpoint are
   three builds, ``<digest>:0`` ``:1`` ``:2``);
3. then the least loaded: (busy slots + queued requests) / slots;
4. ties keep the user's order; a worker that did not answer ``status`` goes
   last (in the user's order), and is still tried there.

Answers are kept for ``STATUS_TTL_S`` (:class:`WorkerStatusCache`), and a node
that ran on a worker adds its digests to that worker's picture.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeGuard

from diffsplit.engine.value_walk import iter_values
from diffsplit.engine.wire_values import CONTROL, MODEL
from diffsplit.tracer.errors import RecipeError
from diffsplit.tracer.recipe import Recipe
from diffsplit.transport.errors import TransportError
from diffsplit.transport.shown import shown
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import STATUS, simple_request

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry

#: How long one worker's ``status`` answer (or its silence) stands before it is asked again.
STATUS_TTL_S = 3.0
#: How long a worker that did not answer ``status`` stays last without being asked again (as long as
#: the runner skips a worker that fell silent during a node), so a dead worker costs one wait, not many.
SILENT_TTL_S = 30.0
#: How long the client waits for the ``status`` answers before a node goes out (all asked at once).
STATUS_TIMEOUT_S = 1.0
#: Once the timeout has passed, how long to look for a status answer that is already in.
_LAST_LOOK_S = 0.01

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLoad:
    """How busy a worker said it was."""

    busy: int
    queued: int
    slots: int

    @property
    def share(self) -> float:
        """(busy slots + queued requests) per slot: 0 is idle, 1 is every slot taken."""
        return (self.busy + self.queued) / max(self.slots, 1)

    def describe(self) -> str:
        """``0 of 2 slots busy, 0 queued``."""
        return f"{self.busy} of {self.slots} slot{'' if self.slots == 1 else 's'} busy, {self.queued} queued"


@dataclass(frozen=True)
class WorkerPicture:
    """What one worker's ``status`` said: its load and the build digests it holds; no load: no answer."""

    load: WorkerLoad | None
    digests: frozenset[str] = frozenset()

    @classmethod
    def from_status(cls, status: Any) -> WorkerPicture:
        """The picture in a ``status`` reply's body (``remote.status.status_report``); ValueError if bad."""
        if not isinstance(status, Mapping):
            raise ValueError("a status is not a mapping")
        queue, slots, models = status.get("queue"), status.get("slots"), status.get("models")
        if not isinstance(queue, Mapping) or not isinstance(slots, Mapping) or not isinstance(models, list):
            raise ValueError("a status needs queue, slots and models")
        busy, queued, total = slots.get("busy"), queue.get("length"), slots.get("total")
        if not (_count(busy) and _count(queued) and _count(total)):
            raise ValueError(f"a status's slot and queue counts must be integers >= 0, got "
                             f"{shown((busy, queued, total), 120)}")
        digests = frozenset(str(model["digest"]) for model in models
                            if isinstance(model, Mapping) and isinstance(model.get("digest"), str))
        return cls(WorkerLoad(busy=busy, queued=queued, slots=total), digests)

    def holding(self, digests: Iterable[str]) -> WorkerPicture:
        """This picture with ``digests`` added (a node that needed them just ran there)."""
        return replace(self, digests=self.digests | frozenset(digests))


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0


#: A worker that did not answer ``status`` (or was not asked).
UNANSWERED = WorkerPicture(load=None)


@dataclass(frozen=True)
class WorkerChoice:
    """One worker in the order a node tries them, and why it stands there."""

    address: str
    reason: str


def order_workers(
    addresses: Sequence[str], pictures: Mapping[str, WorkerPicture], digests: Collection[str]
) -> tuple[WorkerChoice, ...]:
    """``addresses`` in the order to try them for a node needing the models ``digests``.

    A free slot first, then more of ``digests`` held, then the lower load share, then the given
    order; an address without an answered picture goes last. Every address stays in the order.
    """
    wanted = frozenset(digests)

    def key(indexed: tuple[int, str]) -> tuple[int, bool, int, float, int]:
        index, address = indexed
        picture = pictures.get(address, UNANSWERED)
        if picture.load is None:
            return 1, True, 0, 0.0, index
        would_wait = picture.load.share >= 1
        return 0, would_wait, -len(wanted & picture.digests), picture.load.share, index

    choices: list[WorkerChoice] = []
    first_by_load = True
    for _, address in sorted(enumerate(addresses), key=key):
        picture = pictures.get(address, UNANSWERED)
        held = len(wanted & picture.digests)
        if picture.load is None:
            reason = "it did not answer status"
        elif held:
            what = ("the model" if len(wanted) == 1 else "the models") if held == len(wanted) else (
                f"{held} of {len(wanted)} models")
            reason = f"holds {what} ({picture.load.describe()})"
        else:
            reason = f"{'least loaded' if first_by_load else 'next by load'}: {picture.load.describe()}"
            first_by_load = False
        choices.append(WorkerChoice(address, reason))
    return tuple(choices)


def recipe_digests(wire_inputs: Any) -> frozenset[str]:
    """The build digests of every model recipe in a node's inputs as envelope data (``to_wire``'s form).

    Models travel as ``{"$ds:model": recipe}`` and, inside a ControlNet hint, as its
    ``controlnet`` (each hint of a chain); a recipe that does not parse is left out.
    """
    recipes: list[Any] = []
    for value in iter_values(wire_inputs):
        if not isinstance(value, Mapping) or len(value) != 1:
            continue
        if MODEL in value:
            recipes.append(value[MODEL])
        elif CONTROL in value:
            hint = value[CONTROL]
            while isinstance(hint, Mapping):
                recipes.append(hint.get("controlnet"))
                hint = hint.get("previous")
    from diffsplit.engine.rebuild import build_key

    registry = _registry()
    found: set[str] = set()
    for data in recipes:
        try:
            found.add(build_key(Recipe.from_dict(data), registry))
        except (RecipeError, TypeError, ValueError):
            continue
    return frozenset(found)


@functools.cache
def _registry() -> NodeRegistry:
    """The built-in node classes, made once (build keys depend on which loaders build parts alone)."""
    from diffsplit.engine.nodes.registry import default_registry

    return default_registry()


class WorkerStatusCache:
    """Each worker's last ``status`` picture (an answer or its absence), kept ``ttl_s``; thread-safe."""

    def __init__(self, ttl_s: float = STATUS_TTL_S, *, silent_ttl_s: float = SILENT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.silent_ttl_s = silent_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pictures: dict[str, tuple[float, WorkerPicture]] = {}
        #: nodes sent to each worker since its picture was taken, still running: counted as queued there,
        #: so the nodes sent within one TTL do not all go to the worker that was idle when it answered
        self._sent_since: dict[str, int] = {}

    def get(self, address: str) -> WorkerPicture | None:
        """The picture of ``address`` if it is fresh (with the nodes sent to it since), else None."""
        with self._lock:
            known = self._pictures.get(address)
            if known is None:
                return None
            ttl_s = self.silent_ttl_s if known[1].load is None else self.ttl_s
            if self._clock() - known[0] > ttl_s:
                del self._pictures[address]
                return None
            picture, sent = known[1], self._sent_since.get(address, 0)
            if picture.load is None or not sent:
                return picture
            return replace(picture, load=replace(picture.load, queued=picture.load.queued + sent))

    def put(self, address: str, picture: WorkerPicture) -> None:
        """Keep ``picture`` as what ``address`` says now."""
        with self._lock:
            self._pictures[address] = (self._clock(), picture)
            self._sent_since[address] = 0

    def note_sent(self, address: str) -> None:
        """A node went to ``address``: until it finishes (or a new picture), it counts as queued there."""
        with self._lock:
            self._sent_since[address] = self._sent_since.get(address, 0) + 1

    def note_finished(self, address: str) -> None:
        """A node sent to ``address`` finished (or failed)."""
        with self._lock:
            self._sent_since[address] = max(0, self._sent_since.get(address, 0) - 1)

    def note_holds(self, address: str, digests: Iterable[str]) -> None:
        """A node needing ``digests`` ran on ``address``: it holds them now.

        A fresh answered picture gains them (its age unchanged); a kept silence is dropped,
        since the worker answered after all: the next node asks it again.
        """
        digests = frozenset(digests)
        with self._lock:
            known = self._pictures.get(address)
            if known is None:
                return
            stamp, picture = known
            if picture.load is None:
                del self._pictures[address]
            else:
                self._pictures[address] = (stamp, picture.holding(digests))

    def forget(self, address: str) -> None:
        """Drop what ``address`` said (it refused or failed a node: its picture is out of date)."""
        with self._lock:
            self._pictures.pop(address, None)

    def pictures(
        self, addresses: Sequence[str], client_for: Callable[[str], Client], *,
        timeout_s: float = STATUS_TIMEOUT_S,
    ) -> dict[str, WorkerPicture]:
        """A picture per address: the fresh ones kept, the others asked now, all at once.

        An address whose answer does not come within ``timeout_s`` (gone, slow, an error
        reply, a malformed status) gets :data:`UNANSWERED`, which is kept like an answer.
        """
        found: dict[str, WorkerPicture] = {}
        asked: list[tuple[str, Client, str]] = []
        for address in addresses:
            picture = self.get(address)
            if picture is not None:
                found[address] = picture
                continue
            try:
                client = client_for(address)
                asked.append((address, client, client.submit(simple_request(STATUS))))
            except TransportError as exc:
                log.warning("worker %s: cannot ask its status (%s): it is tried last", address, exc)
                found[address] = UNANSWERED
                self.put(address, UNANSWERED)
        deadline = time.monotonic() + timeout_s
        for address, client, request_id in asked:
            picture = UNANSWERED
            try:  # past the deadline, a short wait still takes a reply already in (and cancels otherwise)
                reply = client.result(request_id, timeout=max(_LAST_LOOK_S, deadline - time.monotonic()))
            except TransportError as exc:
                log.warning("worker %s did not answer status (%s: %s): it may be unavailable, so it is "
                            "tried last", address, type(exc).__name__, exc)
            else:
                try:
                    if reply.get("op") != "result":
                        raise ValueError(f"an error reply: {shown(reply.get('error'), 200)}")
                    picture = WorkerPicture.from_status(reply.get("status"))
                except ValueError as exc:
                    log.warning("worker %s gave no usable status (%s): it is tried last", address, exc)
            found[address] = picture
            self.put(address, picture)
        return found
