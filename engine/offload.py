"""The client side of offloading: a node runner that sends labelled nodes to workers.

``RemoteRunner`` plugs into ``Executor.run(node_runner=...)``. Nodes not
assigned to a worker run locally; when a local loader node runs, the runner
remembers, for each model it returned, the recipe that rebuilds it (the
loader sub-graph behind it, files named by sha256). A remote node is sent as
a node-specific workflow: its class, normal inputs inline, intermediate inputs
as tensors, model inputs as recipes. Conditioning the worker already holds is
sent as its digest. Progress streams back into the local progress output.
Model files a node reads while running (the ``embedding:`` files of a prompt)
travel as FileRefs in the request's ``files`` (``engine.run_files``).

Several workers: an assignment may list several (``engine.remote_assign``). A
node tries first the worker that holds its models, else the least loaded, the
user's order breaking ties (``engine.worker_choice``: each worker's ``status``,
asked with a short timeout and kept a few seconds; one worker is never asked).

Worker faults: a worker that is gone (silent past the heartbeat timeout, the
connection lost), overloaded, stopping, or past the deadline is *unavailable*:
the node goes to the next worker in that order, and with ``fallback_local``
finally runs here (the outputs are the same: split == local). A worker found
silent is skipped by later nodes for ``DOWN_FOR_S``. Every attempt (and every
``status`` question) is a new request with a new id, so a late reply from an
abandoned attempt can never be taken for another's (the Client drops replies to
ids it no longer waits for). Other errors (MissingModel without
uploads, BadRequest, a node that fails) are not retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from diffsplit.engine.errors import EngineError, Interrupted, NodeFailed
from diffsplit.engine.executor import NodeCall, run_node_locally
from diffsplit.engine.file_upload import FileShrank, send_file
from diffsplit.engine.graph import Workflow
from diffsplit.engine.lazy_models import LazyModel, can_defer, defer_loader, materialised
from diffsplit.engine.rebuild import comparable_fingerprint
from diffsplit.engine.remote_assign import worker_addresses
from diffsplit.engine.run_files import run_files
from diffsplit.engine.sampling.condition_scales import ChainDecision, condition_log
from diffsplit.engine.store import ModelStore
from diffsplit.engine.value_walk import iter_values
from diffsplit.engine.wire_values import (
    HELD,
    MODEL,
    HintTable,
    WireValueError,
    from_wire,
    is_model_value,
    to_wire,
)
from diffsplit.engine.worker_choice import (
    STATUS_TIMEOUT_S,
    WorkerChoice,
    WorkerStatusCache,
    order_workers,
    recipe_digests,
)
from diffsplit.tracer.files import file_refs_for
from diffsplit.tracer.recipe import RECIPE_TAG, canonical_json
from diffsplit.transport.auth import ClientCurve, client_curve_from_environment
from diffsplit.transport.codec import pack
from diffsplit.transport.compute_threads import client_threads
from diffsplit.transport.digest import content_digest
from diffsplit.transport.errors import (
    MalformedMessage,
    MessageTooLarge,
    PeerGone,
    RequestCancelled,
    TransportError,
    UnsupportedType,
)
from diffsplit.transport.pool import ClientPool, Lease, shared_pool
from diffsplit.transport.protocol import Settings
from diffsplit.transport.shown import shown
from diffsplit.transport.sockets import Client, Exchange
from diffsplit.transport.worker_errors import (
    Cancelled,
    MissingModel,
    NotHeld,
    Overloaded,
    WorkerError,
    error_from_reply,
    is_error_reply,
    with_context,
)
from diffsplit.transport.worker_ops import NodeResult, RunNode

#: (node id, output index) of a local loader node → the recipe dict of that output, or None.
RecipeForOutput = Callable[[str, int], Mapping[str, Any] | None]
#: Recipe sources of the workflows a runner served lately (``RemoteRunner(recipes_for=...)``).
_RECIPE_SOURCES_KEPT = 8

#: Structured errors that mean "not here, not now": the node may go to the next worker or run here.
UNAVAILABLE_ERRORS = (Overloaded, Cancelled)
#: Transport errors about our own messages (or the worker's unreadable reply): no other worker helps.
_NOT_ABOUT_THE_WORKER = (MessageTooLarge, MalformedMessage, UnsupportedType)
#: How long later nodes skip a worker that fell silent or lost its connection.
DOWN_FOR_S = 30.0
#: ``RemoteRunner.placement`` of a node that ran here after its workers failed.
LOCAL = "local"

log = logging.getLogger(__name__)


class RemoteNodeError(EngineError):
    """A worker answered a node with a structured error.

    Each instance is also an instance of the worker's typed error
    (``transport.worker_errors``: MissingModel, NotHeld, Overloaded, NodeFailed…), with
    its fields (a MissingModel's ``name`` and ``sha256``) and ``remote_traceback``;
    build one with :meth:`of`.
    """

    kind: str
    node_id: str
    class_type: str
    address: str
    remote_traceback: str
    #: the error's fields as data (``kind``, ``message`` and what the kind adds)
    error: dict[str, object]

    @classmethod
    def of(cls, node_id: str, class_type: str, address: str, error: WorkerError) -> RemoteNodeError:
        """The client's error for ``error``, told by the worker at ``address`` about node ``node_id``."""
        located = with_context(error, cls, f"node {node_id} ({class_type}) on {address}: "
                                           f"{error.kind}: {error.message}")
        located.node_id, located.class_type, located.address = node_id, class_type, address
        located.error = error.to_reply()
        return located


@dataclass(frozen=True)
class _WireInputs:
    """A node's inputs encoded once: wire values by input name, content digests of the conditioning ones."""

    values: Mapping[str, Any]
    conditioning: Mapping[str, str]


class _Unavailable(Exception):
    """One worker could not take a node now; ``error`` is what to raise if no other can."""

    def __init__(self, address: str, reason: str, error: Exception) -> None:
        self.address = address
        self.reason = reason
        self.error = error
        super().__init__(f"{address}: {reason}")


@dataclass(frozen=True)
class RemoteNodeStats:
    """What one offloaded node cost: bytes each way and where the time went."""

    node_id: str
    class_type: str
    address: str
    request_bytes: int
    reply_bytes: int
    request_tensor_bytes: int
    reply_tensor_bytes: int
    recipe_bytes: int
    queue_s: float
    rebuild_s: float
    run_s: float
    total_s: float
    cache_hits: int
    cache_misses: int
    held_inputs: int
    uploads: int


def _unprinted(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe without its fingerprint (to tell the same build)."""
    return {key: value for key, value in recipe.items() if key != "fingerprint"}


class RemoteRunner:
    """Runs assigned nodes on workers and the rest locally. Thread-safe (one per run or longer).

    ``assigned``: node id → worker address, or several comma-separated, tried in the
    order ``engine.worker_choice`` gives them (``status_timeout_s``: how long their
    ``status`` answers are awaited). ``fallback_local``: a node none of its workers can
    take runs here. ``priority``: sent with every node (the worker serves higher first).
    ``on_waiting``: told why a node waits on its worker (default: a warning in the log).
    ``lazy_loaders``: loader nodes here return handles (``engine.lazy_models``), built only
    when a node here uses them, so a model only remote nodes use is never loaded here; the
    recipes and fingerprints of handles are worked out in a background thread meanwhile.
    ``pool``: where connections to workers come from (default: the process's
    ``transport.pool.shared_pool()``, shared with ``offload``, ``@node`` and profiles).
    ``recipes_for``: the recipe source of another workflow, for a runner that serves several
    (``diffsplit batch``: each item's overrides, a LoRA strength among them, are the item's
    workflow; a loader's recipe is then worked out from the workflow of the call that ran it,
    never from ``recipe_for_output``'s).
    """

    def __init__(
        self,
        assigned: Mapping[str, str],
        recipe_for_output: RecipeForOutput,
        *,
        local_store: ModelStore | None = None,
        upload_missing: bool = False,
        settings: Settings | None = None,
        timeout_s: float | None = None,
        curve: ClientCurve | None = None,
        fallback_local: bool = False,
        status_timeout_s: float = STATUS_TIMEOUT_S,
        priority: int = 0,
        on_waiting: Callable[[NodeCall, str], None] | None = None,
        lazy_loaders: bool = True,
        pool: ClientPool | None = None,
        recipes_for: Callable[[Workflow], RecipeForOutput] | None = None,
    ) -> None:
        self.assigned = dict(assigned)
        self.recipes_for = recipes_for
        self._sources: OrderedDict[int, tuple[Workflow, RecipeForOutput]] = OrderedDict()
        self._workers = {node_id: worker_addresses(spec, f"node {node_id}")
                         for node_id, spec in assigned.items()}
        self.fallback_local = fallback_local
        self.priority = priority
        #: told why a node waits on its worker (queue place, device memory); default: a log warning
        self.on_waiting = on_waiting or self._log_waiting
        self._told_waiting: set[str] = set()
        self.curve = curve if curve is not None else client_curve_from_environment()
        self.recipe_for_output = recipe_for_output
        self.local_store = local_store
        self._file_refs = file_refs_for(local_store)
        self.upload_missing = upload_missing
        self.settings = settings or Settings()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool = pool if pool is not None else shared_pool()
        self._leases: dict[str, Lease] = {}  # address → this runner's lease on the pool's connection
        self._recipes: dict[int, tuple[Any, Mapping[str, Any]]] = {}
        self._by_recipe: dict[str, Any] = {}  # canonical recipe JSON → the model loaded here
        self._held: dict[str, set[str]] = {}
        self._stats: dict[str, RemoteNodeStats] = {}
        self._upload_lock = threading.Lock()  # one upload at a time: two nodes may miss the same file
        self._down: dict[str, float] = {}  # address → until when later nodes skip it
        self._placements: dict[str, str] = {}
        self.status_timeout_s = status_timeout_s
        self._status = WorkerStatusCache()  # what each worker's status said lately
        self.lazy_loaders = lazy_loaders
        self._pending: dict[int, tuple[Any, Future[Mapping[str, Any] | None]]] = {}
        self._background: ThreadPoolExecutor | None = None

    # The NodeRunner protocol.
    def __call__(self, call: NodeCall) -> Sequence[Any]:
        addresses = self._workers.get(call.node.id)
        if addresses is None:
            if self.lazy_loaders and can_defer(call.node_class):
                handles = defer_loader(call.node.id, call.node_class, call.context, call.inputs)
                self._remember_later(call.node.id, handles, self._source_for(call.workflow))
                return handles
            outputs = run_node_locally(call)
            if call.node_class.is_loader:
                self._remember_recipes(call.node.id, outputs, self._source_for(call.workflow))
            return outputs
        return self._run_assigned(call, addresses)

    def placement(self, node_id: str) -> str | None:
        """Where an assigned node last ran: its worker's address, ``LOCAL`` after a fallback, else None."""
        with self._lock:
            return self._placements.get(node_id)

    @property
    def stats(self) -> dict[str, RemoteNodeStats]:
        """Per remote node id, what its last run cost."""
        with self._lock:
            return dict(self._stats)

    def stats_json(self) -> dict[str, Any]:
        """Stats as plain data for ``--stats``."""
        return {node_id: asdict(stats) for node_id, stats in sorted(self.stats.items())}

    def recipe_of(self, value: Any) -> Mapping[str, Any] | None:
        """The recipe of a model object a local loader produced in this run, or None.

        For a deferred loader's handle this waits for its recipe (hashing, fingerprint).
        """
        with self._lock:
            pending = self._pending.get(id(value))
            known = self._recipes.get(id(value))
            handles = list(self._pending.values()) if pending is None and known is None else []
        if pending is not None and pending[0] is value:
            return pending[1].result()
        if known is not None and known[0] is value:
            return known[1]
        for handle, future in handles:  # a handle built here: its model has the handle's recipe
            if handle.holds(value):
                return future.result()
        return None

    def close(self) -> None:
        """Give the connections to workers back to the pool (and stop the background recipe thread)."""
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
            background, self._background = self._background, None
        if background is not None:
            background.shutdown(wait=True, cancel_futures=True)
        for lease in leases:
            lease.release()

    def __enter__(self) -> RemoteRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _source_for(self, workflow: Workflow) -> RecipeForOutput:
        """The recipe source for a call of ``workflow`` (a few recent ones kept, by identity)."""
        if self.recipes_for is None:
            return self.recipe_for_output
        with self._lock:
            known = self._sources.get(id(workflow))
            if known is not None and known[0] is workflow:
                self._sources.move_to_end(id(workflow))
                return known[1]
        source = self.recipes_for(workflow)
        with self._lock:
            self._sources[id(workflow)] = (workflow, source)
            while len(self._sources) > _RECIPE_SOURCES_KEPT:
                self._sources.popitem(last=False)
        return source

    def _remember_recipes(self, node_id: str, outputs: Sequence[Any], source: RecipeForOutput) -> None:
        for index, value in enumerate(outputs):
            if not is_model_value(value):
                continue
            recipe = source(node_id, index)
            if recipe is None:
                continue
            if not recipe.get("fingerprint"):
                # The worker checks its rebuild against the weights this process really loaded.
                recipe = {**recipe, "fingerprint": comparable_fingerprint(value)}
            with self._lock:
                self._recipes[id(value)] = (value, recipe)
                self._by_recipe[canonical_json(recipe)] = value

    def _remember_later(self, node_id: str, handles: Sequence[LazyModel], source: RecipeForOutput) -> None:
        """Work out each handle's recipe in the background; ``recipe_of`` waits for it."""
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffsplit-recipes")
            for handle in handles:
                future = self._background.submit(self._handle_recipe, node_id, handle, source)
                self._pending[id(handle)] = (handle, future)

    def _handle_recipe(self, node_id: str, handle: LazyModel,
                       source: RecipeForOutput) -> Mapping[str, Any] | None:
        recipe = source(node_id, handle.index)
        if recipe is None:
            return None
        recipe = self._with_base_fingerprints(recipe, handle)
        if not recipe.get("fingerprint"):
            found = handle.file_fingerprint()  # from the file: the model is not built for it
            if found is not None:
                recipe = {**recipe, "fingerprint": found}
        with self._lock:
            self._by_recipe[canonical_json(recipe)] = handle
        return recipe

    def _with_base_fingerprints(self, recipe: Mapping[str, Any], handle: LazyModel) -> Mapping[str, Any]:
        """The recipe with the fingerprints of the handles it is built on in its nested recipes.

        A LoRA'd model has no fingerprint until it is built, but the base under it does (from its
        file): the worker checks the base it builds. Bases were deferred earlier, so on this one
        background thread their recipes are already worked out.
        """
        steps = recipe.get("steps")
        if not isinstance(steps, list) or len(steps) != 1 or not isinstance(steps[0].get("kwargs"), dict):
            return recipe
        kwargs = dict(steps[0]["kwargs"])
        for name, base in handle.handle_inputs().items():
            nested = kwargs.get(name)
            if not isinstance(nested, dict) or not isinstance(nested.get(RECIPE_TAG), dict):
                continue
            with self._lock:
                pending = self._pending.get(id(base))
            base_recipe = pending[1].result() if pending is not None and pending[0] is base else None
            if base_recipe is not None and _unprinted(base_recipe) == _unprinted(nested[RECIPE_TAG]):
                kwargs[name] = {RECIPE_TAG: base_recipe}
        return {**recipe, "steps": [{**steps[0], "kwargs": kwargs}]}

    def _log_waiting(self, call: NodeCall, why: str) -> None:
        """The first wait of a node is a warning; its later news (moved up in the queue) is info."""
        with self._lock:
            first = call.node.id not in self._told_waiting
            self._told_waiting.add(call.node.id)
        log.log(logging.WARNING if first else logging.INFO, "node %s (%s): the worker says: %s",
                call.node.id, call.node.class_type, shown(why, 300))

    def _client(self, address: str) -> Client:
        with self._lock:
            lease = self._leases.get(address)
            if lease is not None and lease.client.closed:  # discarded by another holder, or its I/O failed
                lease.release()
                lease = None
            if lease is None:
                lease = self._leases[address] = self._pool.lease(address, settings=self.settings,
                                                                 curve=self.curve)
            return lease.client

    def _run_assigned(self, call: NodeCall, addresses: Sequence[str]) -> Sequence[Any]:
        """Each worker in the chosen order until one runs the node; then, with ``fallback_local``, here."""
        node = call.node
        failures: list[_Unavailable] = []
        digests: frozenset[str] = frozenset()
        wire = self._wire_inputs(call)  # once per node: every worker and every attempt sends these
        order = tuple(WorkerChoice(address, "") for address in addresses)
        if len(addresses) > 1:  # one worker is not asked anything: no extra round trip
            digests = recipe_digests(list(wire.values.values()))
            order = self._choose(addresses, digests)
        for choice in order:
            address = choice.address
            if self._is_down(address):
                reason = "it fell silent or lost its connection earlier in this run"
                log.info("node %s (%s): worker %s skipped: %s", node.id, node.class_type, address, reason)
                failures.append(_Unavailable(address, f"skipped: {reason}", NodeFailed(
                    node.id, node.class_type, f"worker {address} was skipped: {reason}")))
                continue
            if choice.reason:
                log.info("node %s (%s): worker %s %s: %s", node.id, node.class_type, address,
                         "tried next" if failures else "chosen", choice.reason)
            self._status.note_sent(address)
            try:
                outputs = self._run_remote(call, wire, address)
            except _Unavailable as failure:
                self._status.forget(address)  # what it said is out of date
                failures.append(failure)
                log.warning("node %s (%s): worker %s is unavailable: %s", node.id, node.class_type,
                            address, failure.reason)
                continue
            finally:
                self._status.note_finished(address)
            self._status.note_holds(address, digests)
            with self._lock:
                self._placements[node.id] = address
            return outputs
        if self.fallback_local:
            log.warning("node %s (%s): no worker could take it; running it here", node.id, node.class_type)
            outputs = run_node_locally(call)
            with self._lock:
                self._placements[node.id] = LOCAL
            return outputs
        if len(failures) == 1:
            raise failures[0].error
        tried = "; ".join(f"{failure.address}: {failure.reason}" for failure in failures)
        last = failures[-1].error
        raise NodeFailed(node.id, node.class_type, f"no worker could run it ({tried})") from last

    def _choose(self, addresses: Sequence[str], digests: frozenset[str]) -> tuple[WorkerChoice, ...]:
        """The order to try ``addresses`` in; workers known to be down are not asked and go last."""
        asked = [address for address in addresses if not self._is_down(address)]
        pictures = self._status.pictures(asked, self._client, timeout_s=self.status_timeout_s)
        return order_workers(addresses, pictures, digests)

    def _wire_inputs(self, call: NodeCall) -> _WireInputs:
        """The node's inputs as wire values, and each conditioning input's content digest."""
        values: dict[str, Any] = {}
        digests: dict[str, str] = {}
        for name, value in call.inputs.items():
            where = f"node {call.node.id} ({call.node.class_type}) input '{name}'"
            try:
                values[name] = to_wire(value, self.recipe_of, where=where)
            except WireValueError as exc:
                raise NodeFailed(call.node.id, call.node.class_type, str(exc)) from exc
            spec = call.node_class.input(name)
            if spec is not None and spec.type == "CONDITIONING":
                digests[name] = content_digest(values[name])
        return _WireInputs(values, digests)

    def _is_down(self, address: str) -> bool:
        with self._lock:
            until = self._down.get(address)
        return until is not None and time.monotonic() < until

    def _lost(self, address: str) -> None:
        """The worker fell silent or its connection broke: close its client, skip it for a while."""
        with self._lock:
            self._down[address] = time.monotonic() + DOWN_FOR_S
            lease = self._leases.pop(address, None)
        if lease is not None:
            # closed for every holder: a restarted worker never gets requests queued for the dead one
            self._pool.discard(lease.client)
            lease.release()

    def _unavailable(self, call: NodeCall, address: str, exc: TransportError, what: str) -> Exception:
        """The exception for a transport failure: _Unavailable when another worker (or here) may help."""
        node = call.node
        error = NodeFailed(node.id, node.class_type, f"{what}: {exc}")
        error.__cause__ = exc
        if isinstance(exc, _NOT_ABOUT_THE_WORKER):
            return error
        if isinstance(exc, PeerGone) or type(exc) is TransportError:
            self._lost(address)
        return _Unavailable(address, f"{type(exc).__name__}: {exc}", error)

    def _run_remote(self, call: NodeCall, wire: _WireInputs, address: str) -> Sequence[Any]:
        """Run the node on one worker; _Unavailable when that worker cannot take it now."""
        node = call.node
        started = time.monotonic()
        uploads = 0
        files = run_files(call, self._file_refs)
        for attempt in range(4):
            request = self._request(call, wire, address, files, use_held=attempt == 0)
            try:
                exchange = self._client(address).exchange(
                    request.header(), timeout=self.timeout_s,
                    on_progress=lambda message: _forward_progress(call, message, self.on_waiting),
                    cancel=getattr(call.context, "cancel", None),
                )
            except RequestCancelled:
                raise Interrupted(node.id) from None
            except TransportError as exc:
                raise self._unavailable(call, address, exc, f"worker {address}") from exc
            reply = exchange.reply
            if not is_error_reply(reply):
                break
            error = error_from_reply(reply)
            if isinstance(error, NotHeld):
                with self._lock:
                    self._held.pop(address, None)
                continue
            if isinstance(error, MissingModel) and self.upload_missing and uploads < 2:
                try:
                    with self._upload_lock:
                        self._upload(address, error, node.id, node.class_type)
                except RequestCancelled:
                    raise Interrupted(node.id) from None
                except TransportError as exc:
                    raise self._unavailable(call, address, exc, f"upload to {address} failed") from exc
                uploads += 1
                continue
            failure = RemoteNodeError.of(node.id, node.class_type, address, error)
            if isinstance(error, UNAVAILABLE_ERRORS):
                raise _Unavailable(address, f"{error.kind}: {error.message}", failure)
            raise failure
        else:
            raise NodeFailed(node.id, node.class_type, f"worker {address} kept refusing the request")
        result = NodeResult.parse(reply, len(call.node_class.outputs))
        if result is None:
            raise NodeFailed(node.id, node.class_type, "the worker's reply has the wrong outputs")
        outputs = self._decode_outputs(result, call)
        _note_conditions(call, result, address)
        self._record(call, address, request, result, exchange, started, uploads)
        return outputs

    def _request(self, call: NodeCall, wire: _WireInputs, address: str, files: Any, *,
                 use_held: bool) -> RunNode:
        """The ``run_node`` request: conditioning the worker holds goes by digest, the rest is kept there."""
        inputs = dict(wire.values)
        hold: dict[str, str] = {}
        uses_held: list[str] = []
        with self._lock:
            known = set(self._held.get(address, ())) if use_held else set()
        for name, digest in wire.conditioning.items():
            if digest in known:
                inputs[name] = {HELD: digest}
                uses_held.append(digest)
            else:
                hold[name] = digest
        return RunNode(node_id=call.node.id, class_type=call.node.class_type, inputs=inputs, hold=hold,
                       uses_held=tuple(uses_held), files=files or None, deadline_s=self.timeout_s,
                       priority=self.priority, threads=client_threads(),
                       conditions=_condition_settings(call))

    def _decode_outputs(self, result: NodeResult, call: NodeCall) -> tuple[Any, ...]:

        def local_model(recipe: Mapping[str, Any]) -> Any:
            # A model in an output (ControlNetApply's hint, GLIGENTextBoxApply's boxes) is one this
            # process sent: the worker returns its recipe, and the object loaded here stands for it.
            value = self._model_for(recipe)
            if value is None:
                reason = "the worker returned a model this process did not send; run this node locally"
                raise NodeFailed(call.node.id, call.node.class_type, reason)
            return value

        hints = HintTable()  # one hint shared by two outputs stays one object
        return tuple(from_wire(value, local_model, hints=hints) for value in result.outputs)

    def _model_for(self, recipe: Mapping[str, Any]) -> Any:
        try:
            key = canonical_json(recipe)
        except (TypeError, ValueError):
            return None
        with self._lock:
            value = self._by_recipe.get(key)
        # a model the worker hands back is built here (it may sit inside a control hint)
        return materialised(value)

    def _record(
        self, call: NodeCall, address: str, request: RunNode, result: NodeResult, exchange: Exchange,
        started: float, uploads: int,
    ) -> None:
        """Per-node stats: message sizes as the client encoded and received them (nothing re-encoded)."""
        sent, received, timings = exchange.sent, exchange.received, result.timings
        recipes = [v[MODEL] for v in iter_values(request.inputs) if isinstance(v, dict) and MODEL in v]
        stats = RemoteNodeStats(
            node_id=call.node.id, class_type=call.node.class_type, address=address,
            request_bytes=sent.wire_bytes, reply_bytes=received.wire_bytes,
            request_tensor_bytes=sent.tensor_bytes, reply_tensor_bytes=received.tensor_bytes,
            recipe_bytes=sum(len(pack(recipe)) for recipe in recipes),  # as msgpack, the wire's form
            queue_s=timings.queue_s, rebuild_s=timings.rebuild_s, run_s=timings.run_s,
            total_s=time.monotonic() - started, cache_hits=timings.cache_hits,
            cache_misses=timings.cache_misses, held_inputs=len(request.uses_held), uploads=uploads,
        )
        with self._lock:
            self._stats[call.node.id] = stats
            # only what the worker says it kept: a value over its budget is sent in full next time
            self._held.setdefault(address, set()).update(result.held)
            self._held[address].update(request.uses_held)

    def _upload(self, address: str, error: MissingModel, node_id: str, class_type: str) -> None:
        """Send the file ``error`` names from the local store to the worker, in chunks."""

        def refused(why: str | None = None) -> RemoteNodeError:
            told = error if why is None else MissingModel(error.name, error.sha256, error.size, message=why)
            return RemoteNodeError.of(node_id, class_type, address, told)

        if self.local_store is None:
            raise refused()
        try:
            path = self.local_store.find(sha256=error.sha256, name=error.name.rpartition("/")[2] or None)
        except EngineError as exc:
            raise refused() from exc
        entry = self.local_store.entry(path)
        if path.is_dir():
            raise refused(f"{error.message} (model folders cannot be uploaded)")
        # the worker finds files by sha256, so the bare file name is enough (a worker keeps no
        # sub-folders of uploads)
        try:
            with path.open("rb") as stream:
                send_file(self._client(address), stream, folder=entry.folder,
                          name=entry.name.rpartition("/")[2], sha256=entry.sha256, total_bytes=entry.bytes,
                          timeout_s=self.timeout_s)
        except FileShrank as exc:
            raise refused(f"{path} shrank while uploading") from exc
        except WorkerError as exc:
            raise RemoteNodeError.of(node_id, class_type, address, exc) from None


def _forward_progress(call: NodeCall, message: Mapping[str, Any],
                      on_waiting: Callable[[NodeCall, str], None]) -> None:
    waiting = message.get("waiting")
    if isinstance(waiting, str):  # why the node waits on the worker: its place in the queue, or device memory
        on_waiting(call, waiting)
    step, total = message.get("step"), message.get("total")
    if isinstance(step, int) and isinstance(total, int):
        call.context.progress(step, total)


def _condition_settings(call: NodeCall) -> dict[str, Any] | None:
    """The ``--conditions auto`` settings a sampler's request carries (None: the estimator is off)."""
    log = condition_log(call.context)
    if log is None or not call.node_class.prunes_conditions:
        return None
    return log.settings.to_wire()


def _note_conditions(call: NodeCall, result: NodeResult, address: str) -> None:
    """The worker's condition decisions, into this run's log (a malformed one is logged and skipped)."""
    decisions = condition_log(call.context)
    if decisions is None:
        return
    for item in result.conditions:
        try:
            decisions.add(ChainDecision.from_dict(item))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("node %s: worker %s sent a malformed condition decision: %s", call.node.id, address,
                        exc)
