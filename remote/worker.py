"""The worker daemon: receives node-specific workflows, rebuilds models, runs, replies.

A request (op ``run_node``) carries one node: its class, its normal inputs
inline, its intermediate inputs as tensors, and a recipe for every model
input (see ``engine.wire_values``). The worker builds each model from its own
store through the cache (keyed by recipe digest), runs the node's function
with a context that streams progress back, and replies with the outputs or a
structured error: ``MissingModel``, ``BadRequest``, ``NodeFailed``,
``Overloaded``, ``NotHeld``.

Requests wait in one queue per client, served round robin by ``slots``
threads (time-sharing: one client's backlog does not starve another), a
higher ``priority`` (header field, -10..10, default 0) first; one that no
free slot takes at once is told its place in line, and told again each time
it changes (a progress message ``{"queued": n, "waiting": why}``, with
``eta_s`` once jobs of its kind ran here: ``remote.wait_estimate``). A
request cancelled while it waits leaves the queue and is answered at once.
Compute nodes run on the device
through ``engine.device_runner``: several slots share it while their weights
and activations fit its budget, and a node that must wait for device memory
says so the same way (``{"node": id, "waiting": why}``).

Op ``call`` serves ``diffsplit.offload``: a traced object's recipe, a method
(``forward`` of a module or ``__call__`` of a pipeline) and its arguments.

Other ops: ``hello`` (what this worker is), ``stats`` (cache counters),
``echo`` (a link probe: any payload in, ``reply_bytes`` zero bytes back),
``upload`` (a model file in chunks, only with ``allow_upload``), ``status``
(models cached, queue, slots, clients: ``remote.status``), ``free`` (drop
the cached models no running job uses: ``remote.operations``). Every
request gets one log line (``remote.request_log``); ``idle_unload_s`` drops
models left unused that long (``remote.idle_unload``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from diffsplit.engine.device_memory import DeviceMemory, DeviceOutOfMemory, is_placed
from diffsplit.engine.device_runner import computes_on_device, run_on_device
from diffsplit.engine.errors import ModelFileError
from diffsplit.engine.extra_paths import open_store
from diffsplit.engine.folder_views import FileFinder, FolderViews
from diffsplit.engine.hub_cache_files import HubCacheFiles
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.placement import outputs_to_host, tensors_to
from diffsplit.engine.run_files import RunFilesError, parse_run_files
from diffsplit.engine.sampling.condition_scales import ConditionLog
from diffsplit.engine.sampling.condition_settings import ConditionSettings, ConditionSettingsError
from diffsplit.engine.sampling.lockstep import LockstepGroup
from diffsplit.engine.value_walk import iter_values
from diffsplit.engine.wire_values import HintTable, WireValueError, from_wire, to_wire
from diffsplit.remote.batching import BatchMembership, BatchSettings, Member, batch_signature
from diffsplit.remote.builder import ModelBuilder
from diffsplit.remote.cache import CachedModel, ModelCache
from diffsplit.remote.content import ContentFiles
from diffsplit.remote.echo_budget import MAX_ECHO_BYTES, EchoBudget
from diffsplit.remote.errors import BadRequest, Cancelled, NodeFailed, NotHeld, Overloaded, RemoteError
from diffsplit.remote.exposure import check_worker_exposure
from diffsplit.remote.fair_queue import ClientShares, FairQueue, QueueClosed
from diffsplit.remote.held import HeldValues
from diffsplit.remote.idle_unload import IdleUnloader
from diffsplit.remote.operations import free_reply, log_unloads, may_control
from diffsplit.remote.redact import PathRedactor
from diffsplit.remote.request_log import CANCELLED, UNSENT, RequestLog, outcome_of
from diffsplit.remote.status import status_report
from diffsplit.remote.store_indexer import StoreIndexer
from diffsplit.remote.uploads import UploadLimits, UploadReceiver
from diffsplit.remote.wait_estimate import RunTimes, job_kind, node_label, queued_message, wait_s
from diffsplit.remote.work_limits import (
    WorkLimits,
    check_node_inputs,
    check_pipeline_call,
    check_request_bytes,
)
from diffsplit.tracer.objects import is_pipeline
from diffsplit.tracer.recipe import FileRef
from diffsplit.transport.auth import ServerCurve
from diffsplit.transport.compute_threads import intra_op_threads
from diffsplit.transport.digest import content_digest
from diffsplit.transport.errors import DiffsplitError, MessageTooLarge, TransportError, UnsupportedType
from diffsplit.transport.protocol import WORKER_SETTINGS, Settings
from diffsplit.transport.server import Request, Server
from diffsplit.transport.shown import shown
from diffsplit.transport.worker_errors import ERROR_OP, bounded_error, error_reply, is_error_reply
from diffsplit.transport.worker_ops import (
    Call,
    CallResult,
    Echo,
    NodeResult,
    RunFunction,
    RunNode,
    Timings,
    UploadChunk,
    parse_priority,
    parse_threads,
)

from diffsplit import __version__

log = logging.getLogger(__name__)

#: Ops that run on the slot threads (and count against --slots + --max-queue).
#: The ops that queue for a slot, and the type each is parsed into as it arrives.
POOLED_OPS: dict[str, Any] = {op.op: op for op in (RunNode, Call, RunFunction, UploadChunk)}
#: After the grace period, how long cancelled jobs get to reach their next step and stop.
STOP_JOIN_S = 30.0
#: How often a slot gathering a batch looks at the queue again (within ``--batch-wait-ms``).
GATHER_POLL_S = 0.002
#: Intra-op CPU threads of each batch member's own work (its sampler's small tensor steps): more would
#: oversubscribe the cores, N members at once (measured: 4 members x 2 threads ran 0.78x unbatched).
BATCH_MEMBER_THREADS = 1


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``diffsplit worker`` can be told."""

    models: Path
    extra_model_paths: Path | None = None
    #: where files sent by content are kept (``remote.content``); None: a temporary folder
    content_dir: Path | None = None
    #: a Hugging Face cache whose files serve recipes besides the store's (``--hf-cache``); None: none
    hf_cache: Path | None = None
    listen: str = "tcp://127.0.0.1:5555"
    cache_bytes: int = 8 << 30
    held_bytes: int = 256 << 20
    slots: int = 1
    max_queue: int = 16
    allow_upload: bool = False
    trust_code: bool = False
    max_upload_bytes: int = 16 << 30
    grace_s: float = 30.0
    #: intra-op CPU threads per job; None runs each job with the count its client states (split == local)
    threads: int | None = None
    settings: Settings = WORKER_SETTINGS
    curve: ServerCurve | None = None
    #: start without CURVE beyond loopback, or take anonymous uploads on loopback (``remote.exposure``)
    insecure: bool = False
    #: what one request may ask for (``remote.work_limits``): decoded bytes, steps, pixels, batch
    max_request_bytes: int = 4 << 30
    max_steps: int = 10_000
    max_pixels: int = 4096 * 4096
    max_batch: int = 64
    #: requests one client may have waiting beyond the slots; None: half of max_queue, so others get in
    max_queue_per_client: int | None = None
    #: unfinished uploads per client, and how long one may sit idle before it is dropped
    max_uploads_per_client: int = 2
    upload_idle_s: float = 600.0
    #: drop cached models no job used for this many seconds (None: keep them until evicted or freed)
    idle_unload_s: float | None = None
    #: hash every model of the store in the background at start (``remote.store_indexer``)
    index_at_start: bool = True
    #: where nodes compute and in which dtypes (``engine.devices``, ``engine.dtypes``); auto: CUDA, MPS, CPU
    device: str = "auto"
    dtype: str = "auto"
    unet_dtype: str = "auto"
    vae_dtype: str = "auto"
    text_encoder_dtype: str = "auto"
    #: device memory for models and activations (None: free memory at start minus 1 GiB on CUDA)
    vram_bytes: int | None = None
    #: sampler requests of any clients that may sample together as one batch (1: no batching), and
    #: how long a slot waits to gather them (``remote.batching``)
    batch_max: int = 1
    batch_wait_ms: float = 10.0

    @property
    def work_limits(self) -> WorkLimits:
        """The per-request limits as one value."""
        return WorkLimits(max_request_bytes=self.max_request_bytes, max_steps=self.max_steps,
                          max_pixels=self.max_pixels, max_batch=self.max_batch)

    @property
    def client_share(self) -> int:
        """Requests one client may have in flight: the slots plus its part of the queue."""
        waiting = self.max_queue // 2 if self.max_queue_per_client is None else self.max_queue_per_client
        return self.slots + max(0, min(waiting, self.max_queue))


def worker_device_memory(config: WorkerConfig) -> DeviceMemory:
    """The device memory manager for ``config`` (DeviceError/DtypeError name a bad setting)."""
    return DeviceMemory.from_settings(
        config.device, dtype=config.dtype, unet_dtype=config.unet_dtype, vae_dtype=config.vae_dtype,
        text_encoder_dtype=config.text_encoder_dtype, budget_bytes=config.vram_bytes)


class NodeForward(Protocol):
    """Runs ``run_node`` requests elsewhere (``diffsplit serve --ray``)."""

    def __call__(self, request: Request, op: RunNode) -> Mapping[str, Any]:
        """The reply header to send back (an error reply included)."""

    def stats(self) -> Mapping[str, Any]:
        """What ``stats`` reports of where the requests went."""

    def free(self) -> Mapping[str, Any]:
        """``free`` where the requests go (the reply's body)."""


class WorkerFailed(DiffsplitError):
    """The worker stopped on its own: its I/O thread or a slot thread died (exit non-zero, restart it)."""


def client_of(request: Request) -> Hashable:
    """Who sent ``request``, for per-client limits: its CURVE key when allow-listed, else its connection."""
    return request.client_key if request.client_key is not None else request.peer


@dataclass
class _Job:
    request: Request
    received: float
    kind: str = ""  # for its wait estimate (``remote.wait_estimate.job_kind``)
    told: int | None = None  # the ``ahead`` its client was last told (None: not told)
    #: what it must share with others to sample in one batch (``remote.batching``); None: runs alone
    batch_signature: str | None = None
    #: the request's typed op, parsed once as it arrived (``transport.worker_ops``)
    op: Any = None


class _WorkerContext:
    """The NodeContext of a node running on the worker: progress streams back.

    Model files come only from the request's ``files`` (``engine.run_files``),
    found here by sha256; ``resolve`` raises MissingModel when this store lacks one.
    """

    def __init__(
        self,
        node_id: str,
        report: Callable[[int, int], None],
        files: Mapping[tuple[str, str], FileRef] | None = None,
        resolve: Callable[[FileRef], Path] | None = None,
        conditions: ConditionLog | None = None,
    ) -> None:
        self.node_id = node_id
        #: the conditioning scale estimator's log where the request asked for it (samplers read it)
        self.conditions = conditions
        self._report = report
        self._files = dict(files or {})
        self._resolve = resolve

    def model_path(self, folder: str, name: str) -> Path:
        ref = self._files.get((folder, name))
        if ref is None or self._resolve is None:
            raise ModelFileError(f'"{name}" not found in {folder}/: the client sent no such file for node '
                                 f"{self.node_id} (remote nodes read only files sent by sha256)")
        return self._resolve(ref)

    def input_path(self, name: str) -> Path:
        raise BadRequest(f"node {self.node_id} asked for input file {name}: run it locally")

    def output_dir(self) -> Path:
        raise BadRequest(f"node {self.node_id} wants to write files: run output nodes locally")

    def progress(self, step: int, total: int) -> None:
        self._report(step, total)

    def save_image(self, image: Any, filename_prefix: str, *, temporary: bool) -> Path:
        raise BadRequest(f"node {self.node_id} wants to save images: run output nodes locally")


class Worker:
    """One worker daemon bound to ``config.listen``; ``serve()`` runs until ``stop()``."""

    def __init__(self, config: WorkerConfig, *, registry: NodeRegistry | None = None,
                 forward: NodeForward | None = None) -> None:
        """``forward``: where ``run_node`` requests go instead of this process's models (``diffsplit serve
        --ray``: to the replicas of a Ray Serve application); it returns the reply to send. Everything
        else (limits, the fair queue, priorities, places, cancel, security) is this worker's own."""
        if config.trust_code and (config.curve is None or not config.curve.authenticates_clients):
            raise BadRequest(
                "--trust-code needs CURVE with an allow-list of client keys (--curve-secret and "
                "--curve-clients): code is only ever accepted from authenticated clients"
            )
        check_worker_exposure(config.listen, config.curve, allow_upload=config.allow_upload,
                              insecure=config.insecure)
        self.config = config
        self._forward = forward
        self.registry = registry if registry is not None else default_registry()
        self.store = open_store(config.models, config.extra_model_paths)
        self.indexer = StoreIndexer(self.store) if config.index_at_start else None
        #: rewrites this machine's paths out of every error reply (the last line of defence)
        self.redactor = PathRedactor.for_store(self.store.root, self.store.extra_folders)
        self.cache = ModelCache(config.cache_bytes)
        #: placed copies of the cached models on the compute device, under the device budget
        self.memory = worker_device_memory(config)
        # computing in fp16/bf16: an fp16 file's weights are kept in fp16 (half the cache), not doubled
        policy = self.memory.policy
        try:
            self.batching = BatchSettings(config.batch_max, config.batch_wait_ms / 1000)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        upload_limits = UploadLimits(max_file_bytes=config.max_upload_bytes,
                                     max_partials_per_client=config.max_uploads_per_client,
                                     idle_s=config.upload_idle_s)
        #: files clients sent by content (adapters loaded outside a trace), never in the store
        self.content = ContentFiles(config.content_dir, upload_limits)
        finders: list[FileFinder] = [self.store.find_file]
        if config.hf_cache is not None:
            finders.append(HubCacheFiles(config.hf_cache).find_file)
        self.builder = ModelBuilder(self.store, self.registry, self.cache,
                                    master_dtypes=None if policy.all_float32 else policy,
                                    content=self.content, views=FolderViews(finders))
        self.held = HeldValues(config.held_bytes)
        self.echo_budget = EchoBudget()
        #: one object per distinct ControlNet hint, across requests and held values (cond/uncond batching)
        self.hints = HintTable()
        self.uploads = UploadReceiver(Path(config.models), upload_limits)
        self.limits = config.work_limits
        self._membership = BatchMembership()
        self._stopping = threading.Event()
        self._failure: str | None = None
        self._running: dict[str, Request] = {}
        self._running_lock = threading.Lock()
        self._in_flight = threading.Semaphore(config.slots + config.max_queue)
        self._shares = ClientShares(config.client_share)  # one client never takes the whole queue
        self._queue: FairQueue[_Job] = FairQueue()
        self._telling = threading.Lock()  # one pass of telling queued clients their places at a time
        self._run_times = RunTimes()
        self._slots = [
            threading.Thread(target=self._serve_slot, name=f"diffsplit-slot-{n}", daemon=True)
            for n in range(config.slots)
        ]
        try:
            self.server = Server(config.listen, settings=config.settings, curve=config.curve,
                                 on_cancel=self._drop_cancelled)
        except BaseException:
            self.content.close()  # a worker that never started leaves no temporary folder behind
            raise
        self.endpoint = self.server.endpoint
        #: one log line per request; client counts for ``status``
        self.requests = RequestLog(connected_s=config.settings.heartbeat_timeout)
        self._started_at = time.monotonic()
        self._idle_unloader = None if config.idle_unload_s is None else IdleUnloader(
            self.cache, config.idle_unload_s, on_unload=self._log_unloads)

    def serve(self) -> None:
        """Receive and dispatch requests until :meth:`stop`; then drain and close.

        Raises WorkerFailed (after the same drain) when the server's I/O thread
        or a slot thread died: the daemon cannot go on, and its exit must say so.
        """
        for slot in self._slots:
            slot.start()
        if self._idle_unloader is not None:
            self._idle_unloader.start()
        if self.indexer is not None:
            self.indexer.start()
        try:
            while not self._stopping.is_set():
                try:
                    request = self.server.recv(timeout=0.2)
                except TransportError as exc:
                    self._fail(f"the server's I/O thread stopped: {self.server.failure or exc!r}")
                    break
                if request is not None:
                    self._dispatch_guarded(request)
        finally:
            self._shutdown()
        if self._failure is not None:
            raise WorkerFailed(self._failure)

    @property
    def failure(self) -> str | None:
        """Why the worker stopped on its own (a dead I/O or slot thread), else None."""
        return self._failure

    def _fail(self, reason: str) -> None:
        """Record the first fatal failure and stop (``serve`` then raises WorkerFailed)."""
        with self._running_lock:
            if self._failure is None:
                self._failure = reason
        log.critical("the worker cannot go on: %s", reason)
        self.stop()

    def _dispatch_guarded(self, request: Request) -> None:
        """``_dispatch``; a failure there is answered to that request, never the end of ``serve``."""
        try:
            self._dispatch(request)
        except Exception as exc:
            log.exception("dispatching request %s failed", shown(request.request_id))
            self._reply_error(request, BadRequest(f"the worker failed on this request: {type(exc).__name__}"))

    def stop(self) -> None:
        """Stop accepting work; in-flight requests get ``grace_s`` to finish. Thread-safe."""
        self._stopping.set()

    def _admit(self, request: Request) -> str | None:
        """Why a pooled request cannot be queued now, else None (it then holds a place and a client share)."""
        if self._stopping.is_set():
            return "the worker is shutting down"
        client = client_of(request)
        if not self._shares.acquire(client):
            return (f"this client already has {self._shares.limit} requests waiting or running, its share of "
                    "this worker (--slots plus --max-queue-per-client); wait for a reply before sending more")
        if not self._in_flight.acquire(blocking=False):
            self._shares.release(client)
            return "the queue is full"
        return None

    def _dispatch(self, request: Request) -> None:
        self.requests.received(request)
        if self._forward is not None and request.op in POOLED_OPS and request.op != RunNode.op:
            self._reply_error(request, BadRequest(
                f"op {request.op} is not served here: this endpoint hands workflow nodes (run_node) to a Ray "
                "Serve application; a diffsplit worker serves offload(), @node and uploads"))
            return
        if request.op in POOLED_OPS:
            try:  # parsed once, before it takes a place or a client share: a malformed one is told now
                op = POOLED_OPS[request.op].parse(request.header)
                priority = parse_priority(request.header)
            except BadRequest as exc:
                self._reply_error(request, exc)
                return
            refusal = self._admit(request)
            if refusal is not None:
                self._reply_error(request, Overloaded(refusal))
                return
            signature = batch_signature(op) if self.batching.enabled and isinstance(op, RunNode) else None
            job = _Job(request, time.monotonic(), job_kind(request.op, request.header),
                       batch_signature=signature, op=op)
            self._queue.put(client_of(request), job, priority)
            # cancelled before it was queued: the server's on_cancel found nothing to drop
            if not (request.cancelled.is_set() and self._drop_cancelled(request)):
                self._tell_places()
            return
        handlers = {"hello": self._hello, "echo": self._echo, "stats": self._stats, "status": self._status,
                    "free": self._free}
        handler = handlers.get(request.op)
        try:
            if handler is None:
                raise BadRequest(f"unknown op {shown(request.op)}")
            handler(request)
        except RemoteError as exc:
            self._reply_error(request, exc)
        except Exception as exc:  # one bad request never stops the daemon
            log.exception("op %s failed", shown(request.op))
            self._reply_error(request, BadRequest(f"{shown(request.op)} failed: {type(exc).__name__}: {exc}"))

    def _tell_places(self) -> None:
        """Tell each queued client where its request waits, whenever that changed since it was last told.

        ``queued`` is its 1-based place in line: the requests the fair queue will serve before it as
        things stand (``FairQueue.order``), plus one; a later request of a higher priority, or of a
        client with fewer waiting, can still go ahead of it. Nothing is said to a request that a
        free slot is there for. Call after every change to the queue.
        """
        slots = self.config.slots
        with self._telling:
            order = self._queue.order()
            for ahead, job in enumerate(order.items):
                if ahead + order.taken < slots or job.told == ahead:
                    continue
                job.told = ahead
                eta = wait_s(self._run_times.mean(job.kind), ahead=ahead, busy=order.taken, slots=slots)
                message = queued_message(ahead=ahead, busy=order.taken, slots=slots, eta_s=eta,
                                         node=node_label(job.request.header))
                try:
                    self.server.progress(job.request, message)
                except TransportError as exc:  # only news: the request still runs when its turn comes
                    log.warning("could not tell request %s its place in the queue: %s",
                                shown(job.request.request_id), exc)

    def _drop_cancelled(self, request: Request) -> bool:
        """A cancelled request still queued leaves the queue and is answered now (the server's
        ``on_cancel``, on its I/O thread); False when it is not queued (running, or answered)."""
        dropped = self._queue.remove(lambda job: job.request is request)
        for job in dropped:
            self._shares.release(client_of(job.request))
            self._in_flight.release()
            self._reply_error(job.request,
                              Cancelled(f"request {request.request_id} was cancelled while queued"))
        if dropped:
            self._tell_places()
        return bool(dropped)

    def _hello(self, request: Request) -> None:
        self._send(request, {"op": "result", "worker": self._describe()})

    def _stats(self, request: Request) -> None:
        report = {"op": "result", "cache": vars(self.cache.stats()),
                  "batching": self._membership.report(self.batching),
                  "device": dataclasses.asdict(self.memory.stats())}
        if self._forward is not None:
            report["forwarded"] = dict(self._forward.stats())
        self._send(request, report)

    def _status(self, request: Request) -> None:
        """Op ``status``: models cached, queue, slots, clients (read-only; no paths, no keys)."""
        with self._running_lock:
            busy = len(self._running)
        report = status_report(
            cache=self.cache, requests=self.requests, queue_length=len(self._queue),
            max_queue=self.config.max_queue, busy_slots=busy, slots=self.config.slots,
            idle_unload_s=self.config.idle_unload_s, uptime_s=time.monotonic() - self._started_at,
            authenticates_clients=self.server.is_authenticated)
        self._send(request, {"op": "result", "status": report})

    def _log_unloads(self, dropped: list[CachedModel]) -> None:
        log_unloads(self.requests.logger, dropped)

    def _free(self, request: Request) -> None:
        """Op ``free``: drop every cached model no running job uses; the reply lists what went."""
        may_control(request, self.endpoint, authenticates_clients=self.server.is_authenticated)
        if self._forward is not None:  # the models are where the requests go
            self._send(request, {"op": "result", **self._forward.free()})
            return
        self.memory.free_unpinned()
        self._send(request, free_reply(self.cache, self.requests.logger))

    def _echo(self, request: Request) -> None:
        """Link probe: ``reply_bytes`` zero bytes back (at most 3 MiB, inside the header); any data in."""
        size = Echo.parse(request.header, MAX_ECHO_BYTES).reply_bytes
        if not self.echo_budget.take(size):
            raise Overloaded("echo: this worker's budget of echo reply bytes per second is spent; try later")
        self._send(request, {"op": "result", "data": bytes(size)})

    def _describe(self) -> dict[str, Any]:
        return {"version": __version__, "slots": self.config.slots, "allow_upload": self.config.allow_upload,
                "cache_budget_bytes": self.config.cache_bytes, "device": str(self.memory.device),
                "dtypes": self.memory.policy.describe(), "device_budget_bytes": self.memory.budget_bytes}

    def _upload(self, request: Request, chunk: UploadChunk, received: float) -> dict[str, Any]:
        """Op ``upload``: one chunk of a model file (on a slot thread: the final chunk hashes the file)."""
        if not self.config.allow_upload:
            raise BadRequest("uploads are off on this worker (start it with --allow-upload)")
        if not request.authenticated and not self.config.insecure:
            raise BadRequest("uploads are accepted only from allow-listed CURVE clients")
        try:
            receiver = self.content if chunk.content else self.uploads
            path = receiver.receive(chunk, client_of(request))
        except OSError as exc:  # the reason only: the peer never sees this worker's paths
            raise BadRequest(f"upload failed on the worker: {exc.strerror or type(exc).__name__}") from exc
        return {"op": "result", "installed": None if path is None else path.name}

    def _serve_slot(self) -> None:
        """One slot: take the next request, client by client in turn, until the queue closes.

        A slot that dies anyway (SystemExit from a node, a bug here) stops the
        worker with a failure, rather than leave clients queued for no slot.
        """
        job: _Job | None = None
        try:
            while True:
                job = None
                try:
                    job = self._queue.get(timeout=0.5)
                except QueueClosed:
                    return
                if job is not None:
                    self._tell_places()  # those behind it moved up
                    self._run_gathered(job)
        except BaseException as exc:  # the thread ends here: the process must exit non-zero
            name = threading.current_thread().name
            log.exception("%s died", name)
            reason = f"{name} died: {type(exc).__name__}: {exc}"
            if job is not None:  # its client hears why now, not after a heartbeat timeout
                self._reply_error(job.request, NodeFailed(f"the worker's {reason}; it is restarting"))
            self._fail(reason)

    def _run_gathered(self, job: _Job) -> None:
        """Run ``job``, with the queued requests that can sample beside it when batching is on."""
        extras = self._gather(job.batch_signature) if job.batch_signature is not None else []
        if not extras:
            self._run_job(job)
            return
        try:  # the shared passes get the thread count the request asks for; members sample on one each
            pass_threads = self._threads_for(job.request)
        except BadRequest:
            pass_threads = None  # its own run reports the bad count
        group = LockstepGroup(1 + len(extras), pass_threads=pass_threads)
        threads = [threading.Thread(target=self._run_batch_member, args=(extra, Member(group, n + 1)),
                                    name=f"diffsplit-batch-{n + 1}", daemon=True)
                   for n, extra in enumerate(extras)]
        log.info("sampling %d requests as one batch (%s)", len(threads) + 1,
                 shown(job.request.header.get("node"), 120))
        for thread in threads:
            thread.start()
        self._run_job(job, Member(group, 0))
        for thread in threads:
            thread.join()

    def _gather(self, signature: str) -> list[_Job]:
        """Queued requests with ``signature`` (up to ``--batch-max`` in all), waiting ``--batch-wait-ms``."""
        wanted = self.batching.max_size - 1
        deadline = time.monotonic() + self.batching.wait_s
        taken: list[_Job] = []
        while True:
            room = wanted - len(taken)

            def fits(candidate: _Job) -> bool:
                nonlocal room
                if room <= 0 or candidate.request.cancelled.is_set():
                    return False
                if candidate.batch_signature != signature:
                    return False
                room -= 1
                return True

            taken += self._queue.remove(fits)
            left = deadline - time.monotonic()
            if len(taken) >= wanted or left <= 0 or self._stopping.is_set():
                break
            time.sleep(min(GATHER_POLL_S, left))
        if taken:
            self._tell_places()  # those behind them moved up
        return taken

    def _run_batch_member(self, job: _Job, member: Member) -> None:
        try:
            self._run_job(job, member, counted=False)
        except BaseException as exc:  # the batch's own thread: its client hears why, the worker goes on
            log.exception("batch member %d died", member.index)
            self._reply_error(job.request, NodeFailed(f"the worker's batch thread died: {exc!r}"))

    def _run_job(self, job: _Job, member: Member | None = None, *, counted: bool = True) -> None:
        """Run one request and answer it. ``member``: its place in a batch; ``counted``: a slot
        took it from the queue (a batch's other members were taken by :meth:`_gather`)."""
        request = job.request
        self._membership.join(member)
        with self._running_lock:
            self._running[request.request_id] = request
        self.requests.started(request)
        started = time.monotonic()
        answer: Callable[[], None]
        try:
            if self._stopping.is_set():
                raise Overloaded("the worker is shutting down")
            if request.cancelled.is_set():  # a slot took it just before its cancel could drop it
                raise Cancelled(f"request {request.request_id} was cancelled while queued")
            run: dict[str, Callable[[Request, Any, float], dict[str, Any]]] = {
                "run_node": self._run_node, "call": self._run_call, "run_function": self._run_function,
                "upload": self._upload}
            if self._forward is not None:  # only run_node is queued here (see _dispatch)
                run = {"run_node": self._forward_node}
            threads = self._threads_for(request)
            if member is not None:
                threads = BATCH_MEMBER_THREADS  # the group's shared passes use the request's count
            with intra_op_threads(threads), self.cache.job_scope():
                reply = run[request.op](request, job.op, job.received)
        except RemoteError as exc:
            answer = partial(self._reply_error, request, exc)
        except ModelFileError as exc:
            answer = partial(self._reply_error, request, BadRequest(str(exc)))
        except Exception as exc:  # the node's own failure: reported, never fatal to the worker
            log.exception("node failed for request %s", request.request_id)
            answer = partial(self._reply_error, request,
                             NodeFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        else:
            answer = partial(self._send, request, reply)
            self._run_times.record(job.kind, time.monotonic() - started)
        finally:
            # the slot is free before the client hears back, so the request it sends next never finds
            # this one still counted as running (and is not told it waits for a free slot)
            self._membership.leave()
            if counted:
                self._queue.done()
            with self._running_lock:
                self._running.pop(request.request_id, None)
            self._shares.release(client_of(request))
            self._in_flight.release()
        answer()

    def _threads_for(self, request: Request) -> int | None:
        if self.config.threads is not None:
            return self.config.threads
        return parse_threads(request.header)

    def _forward_node(self, request: Request, op: RunNode, received: float) -> dict[str, Any]:
        """``run_node`` handed to ``forward`` (its reply, an error reply included, goes back as it is)."""
        assert self._forward is not None
        if op.deadline_s is not None and time.monotonic() - received > op.deadline_s:
            raise Cancelled(f"deadline of {op.deadline_s} s passed while queued")
        return dict(self._forward(request, op))

    def _run_node(self, request: Request, op: RunNode, received: float) -> dict[str, Any]:
        started = time.monotonic()
        deadline = op.deadline_s
        if deadline is not None and started - received > deadline:
            raise Cancelled(f"deadline of {deadline} s passed while queued")
        node_class = self.registry.get(op.class_type) if op.class_type in self.registry else None
        if node_class is None:
            raise BadRequest(f"unknown node class {shown(op.class_type)}")
        if node_class.output_node:
            raise BadRequest(f"{node_class.name} is an output node; output nodes run locally")
        inputs_wire = op.inputs
        node_ref = op.node_id[:64]
        try:
            conditions = (None if op.conditions is None
                          else ConditionLog(ConditionSettings.from_wire(op.conditions)))
        except ConditionSettingsError as exc:
            raise BadRequest(str(exc)) from exc
        # ranges, choices and the work asked for, then the memory decoding takes: before anything is built
        check_node_inputs(self.registry, node_class, node_ref, inputs_wire, self.limits)
        held = self._held_values(op.uses_held)
        check_request_bytes(inputs_wire, held, self.limits, what=f"node {node_ref} ({node_class.name})")
        try:
            files = parse_run_files(op.files)
        except RunFilesError as exc:
            raise BadRequest(str(exc)) from exc
        builds_before = self.cache.stats()
        try:
            inputs = {
                name: from_wire(value, self.builder.build, held, self.hints)
                for name, value in inputs_wire.items()
            }
        except WireValueError as exc:
            raise BadRequest(str(exc)) from exc
        check_node_inputs(self.registry, node_class, node_ref, inputs, self.limits)  # upscale models' scales
        held_now: list[str] = []
        for name in op.hold:
            spec = node_class.input(name)
            if spec is not None and spec.type == "CONDITIONING" and name in inputs:
                # keyed by the digest computed here: a peer cannot file a value under another's digest
                digest = content_digest(inputs_wire[name])
                self.held.put(digest, inputs[name])
                if digest in self.held:  # values over the budget are not kept: tell the client
                    held_now.append(digest)
        rebuilt = time.monotonic()
        node_id = op.node_id

        def report(step: int, total: int) -> None:
            if request.cancelled.is_set():
                if self._stopping.is_set():
                    raise Cancelled("the worker stopped before the node finished")
                raise Cancelled(f"request {request.request_id} was cancelled")
            if deadline is not None and time.monotonic() - received > deadline:
                raise Cancelled(f"deadline of {deadline} s passed while running")
            self.server.progress(request, {"node": node_id, "step": step, "total": total})

        context = _WorkerContext(node_id, report, files, self.builder.builder.resolve_file, conditions)

        def waiting(why: str) -> None:
            self.server.progress(request, {"node": node_id, "waiting": why})

        def run(placed: dict[str, Any]) -> Any:
            try:
                return node_class.function(context, **self._membership.in_batch(placed))
            finally:
                self._membership.leave()  # its batch's next rounds do not wait for it

        outputs = self._compute(node_class, inputs, run, waiting=waiting)
        finished = time.monotonic()
        builds_after = self.cache.stats()
        try:
            outputs_wire = [to_wire(value, self.builder.recipe_of, where=f"output {i}")
                            for i, value in enumerate(outputs)]
        except WireValueError as exc:
            raise BadRequest(f"{node_class.name} outputs cannot be sent back: {exc}") from exc
        timings = Timings(queue_s=started - received, rebuild_s=rebuilt - started, run_s=finished - rebuilt,
                          cache_hits=builds_after.hits - builds_before.hits,
                          cache_misses=builds_after.misses - builds_before.misses)
        decided = () if conditions is None else tuple(d.to_dict() for d in conditions.snapshot())
        return NodeResult(outputs=tuple(outputs_wire), held=tuple(held_now), timings=timings,
                          conditions=decided).header()

    def _compute(self, node_class: Any, inputs: dict[str, Any], run: Callable[[dict[str, Any]], Any],
                 *, waiting: Callable[[str], None]) -> Any:
        """Run a node with its models placed on the compute device (compute nodes only)."""
        if not computes_on_device(node_class):
            return run(inputs)
        try:
            return run_on_device(self.memory, node_class, inputs, run, on_wait=waiting)
        except DeviceOutOfMemory as exc:
            raise NodeFailed(str(exc)) from exc

    def _run_function(self, request: Request, op: RunFunction, received: float) -> dict[str, Any]:
        """Op ``run_function``: a ``@node`` step's pickled code (only --trust-code, only authenticated)."""
        if not self.config.trust_code:
            raise BadRequest("this worker does not run code sent by clients (start it with --trust-code)")
        if not request.authenticated:
            raise BadRequest("code is only accepted from an authenticated (CURVE allow-listed) client")
        import cloudpickle  # reached only with --trust-code over an authenticated CURVE connection

        function = cloudpickle.loads(op.code.numpy().tobytes())
        if not callable(function):
            raise BadRequest("the pickled value is not callable")
        return self._invoke(function, op, request.op, received)

    def _run_call(self, request: Request, op: Call, received: float) -> dict[str, Any]:
        """Op ``call``: build a traced object from its recipe and call it (``forward`` or the pipeline)."""
        started = time.monotonic()
        obj = self.builder.build(op.target)
        if op.method == "forward" and not isinstance(obj, torch.nn.Module):
            raise BadRequest(f"the target is a {type(obj).__name__}, not a module with forward()")
        if op.method == "__call__" and not is_pipeline(obj):
            raise BadRequest(f"the target is a {type(obj).__name__}, not a pipeline")
        return self._invoke(obj, op, request.op, received, started=started)

    def _invoke(
        self, function: Any, op: Call | RunFunction, what: str, received: float, *,
        started: float | None = None,
    ) -> dict[str, Any]:
        """Decode the arguments (models from recipes), call, encode the result and generator states."""
        started = time.monotonic() if started is None else started
        check_request_bytes([op.args, op.kwargs], {}, self.limits, what=what)
        if is_pipeline(function):
            check_pipeline_call(op.kwargs, self.limits)
        try:
            args = from_wire(op.args, self.builder.build)
            kwargs = from_wire(op.kwargs, self.builder.build)
        except WireValueError as exc:
            raise BadRequest(str(exc)) from exc
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BadRequest("'args' must be a list and 'kwargs' a mapping")
        rebuilt = time.monotonic()
        with torch.no_grad():
            output = self._call_on_device(function, args, kwargs)
        finished = time.monotonic()
        generators = [value for value in iter_values([args, kwargs]) if isinstance(value, torch.Generator)]
        try:
            output_wire = to_wire(output, self.builder.recipe_of, where="result")
        except WireValueError as exc:
            raise BadRequest(f"the result cannot be sent back: {exc}") from exc
        timings = Timings(queue_s=started - received, rebuild_s=rebuilt - started, run_s=finished - rebuilt)
        return CallResult(output=output_wire, generator_states=tuple(g.get_state() for g in generators),
                          timings=timings).header()

    def _call_on_device(self, function: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call ``function``; a module runs on the compute device in its own dtype (arguments moved there,
        the result brought back to the CPU). Pipelines and functions run where they are."""
        if not isinstance(function, torch.nn.Module) or is_placed(function, self.memory.device, None):
            return function(*args, **kwargs)
        device = self.memory.device
        with self.memory.job(what=type(function).__name__):
            placed = self.memory.place_as(function, None)
            moved_args, moved_kwargs = tensors_to(device, [args, kwargs])
            return outputs_to_host(placed(*moved_args, **moved_kwargs))

    def _held_values(self, uses: tuple[str, ...]) -> dict[str, Any]:
        wanted = list(uses)
        found = self.held.snapshot(wanted)
        missing = [d for d in wanted if d not in found]
        if missing:
            raise NotHeld(missing)
        return found

    def _reply_error(self, request: Request, error: RemoteError) -> None:
        self._send(request, {"op": ERROR_OP, "error": bounded_error(self.redactor.reply(error.to_reply()))})

    def _send(self, request: Request, reply: Mapping[str, Any]) -> None:
        if request.cancelled.is_set() and not is_error_reply(reply):
            self.requests.finished(request, CANCELLED)
            return
        try:
            self.server.reply(request, reply)
            self.requests.finished(request, outcome_of(reply), reply)
        except (MessageTooLarge, UnsupportedType) as exc:
            # nothing was sent: the client must hear why rather than wait forever
            failure = NodeFailed(f"the reply could not be sent: {exc}")
            try:
                self.server.reply(request, error_reply(failure))
                self.requests.finished(request, failure.kind)
            except TransportError:
                log.warning("could not reply to request %s: %s", request.request_id, exc)
                self.requests.finished(request, UNSENT)
        except TransportError as exc:
            log.warning("could not reply to request %s: %s", request.request_id, exc)
            self.requests.finished(request, UNSENT)

    def _shutdown(self) -> None:
        """Queued jobs are refused, running ones get ``grace_s``, then fail clearly."""
        self._stopping.set()
        if self._idle_unloader is not None:
            self._idle_unloader.stop()
        if self.indexer is not None:
            self.indexer.stop()
        for job in self._queue.close():  # queued, never started: refused clearly
            self._reply_error(job.request, Overloaded("the worker is shutting down"))
            self._shares.release(client_of(job.request))
            self._in_flight.release()
        # with the I/O thread dead no reply can leave: running jobs are cancelled at once
        grace_s = 0.0 if self.server.failure is not None else self.config.grace_s
        deadline = time.monotonic() + grace_s
        acquired = 0
        total = self.config.slots + self.config.max_queue
        while acquired < total and time.monotonic() < deadline:
            if self._in_flight.acquire(timeout=0.1):
                acquired += 1
        with self._running_lock:
            unfinished = list(self._running.values())
        for request in unfinished:  # each stops at its next step, replying Cancelled itself
            request.cancelled.set()
        self._join_slots(STOP_JOIN_S)
        with self._running_lock:
            stuck = list(self._running.values())
        for request in stuck:  # still inside one long step: reply for it now
            self._reply_error(request, Cancelled("the worker stopped before the node finished"))
        time.sleep(0.1 if unfinished else 0)  # let the I/O thread flush the last replies
        self.server.close()
        self.content.close()

    def _join_slots(self, timeout_s: float) -> None:
        """Wait for the slot threads to return (the queue is closed, so they do once idle)."""
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            if slot.is_alive():
                slot.join(max(0.0, deadline - time.monotonic()))

    @property
    def busy(self) -> bool:
        """Whether a slot is still inside a job (after :meth:`serve` returned: one long step)."""
        return any(slot.is_alive() for slot in self._slots)
