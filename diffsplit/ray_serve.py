"""``diffsplit serve --ray``: diffsplit workers as the replicas of a Ray Serve application.

::

    clients ─ZeroMQ─▶ front (a Worker whose run_node is forwarded) ─Serve handle─▶ replicas (a Worker each)

The front is a real :class:`~diffsplit.remote.worker.Worker` on ``--listen``:
the same protocol, CURVE, limits, fair queue, priorities, places and cancel as
``diffsplit worker``, so the same clients reach it. It builds no model: each
``run_node`` goes through the deployment handle with the request's recipe
digest as its *multiplexed model id*, so Serve sends it to a replica that
already holds those models (each replica reports the digests it holds, up to
``--models-per-replica``). A replica gathers the calls arriving together, from
any clients (``@serve.batch``), and hands them at once to its own worker on
loopback, which samples the compatible ones in lockstep (``--batch-max``).

Messages cross Ray as packed envelopes (``transport.packed``): msgpack and raw
tensor bytes, decoded with the worker's limits, never unpickled by diffsplit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from diffsplit.engine.worker_choice import recipe_digests
from diffsplit.ray_connect import ray_error_line
from diffsplit.remote.errors import Cancelled, NodeFailed, Overloaded
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.auth import ClientCurve, ServerCurve, generate_keypair
from diffsplit.transport.errors import RequestCancelled, TransportError
from diffsplit.transport.packed import pack_message, unpack_message
from diffsplit.transport.server import Request
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import error_reply
from diffsplit.transport.worker_ops import RunNode

log = logging.getLogger(__name__)
APP_PREFIX = "diffsplit"
DEPLOYMENT_NAME = "diffsplit-worker"
#: How often a forwarded request checks for its client's cancel while the replica works.
POLL_S = 0.25
#: Connections one replica keeps to its own worker, one per client of the front (least recent closed first).
MAX_CLIENTS_PER_REPLICA = 64
#: The most calls ``@serve.batch`` gathers (the worker's ``--batch-max`` bound).
MAX_GATHERED = 64


@dataclass(frozen=True)
class ServeLayout:
    """How the replicas are laid out on the cluster."""

    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    models_per_replica: int = 4


def model_id_of(op: RunNode) -> str:
    """The multiplexed model id of a node request: a digest over the recipe digests of its model inputs
    ("" when it has none: any replica will do)."""
    digests = sorted(recipe_digests(list(op.inputs.values())))
    if not digests:
        return ""
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()[:32]


class ReplicaCore:
    """One replica's worker on loopback, and a connection to it per client of the front (so the worker's
    fair queue and client shares see the front's clients, not one client). Needs no running Ray.

    The worker takes only this core's connections: CURVE with a key pair made for it and one
    allowed client key, so no other process on the machine can send it work. A forwarded
    request can be cancelled by its client's name and request id (:meth:`cancel`).
    """

    def __init__(self, config: WorkerConfig) -> None:
        server_keys, self._client_keys = generate_keypair(), generate_keypair()
        self._curve = ClientCurve(server_keys.public, self._client_keys)
        self.worker = Worker(replace(config, listen="tcp://127.0.0.1:*", insecure=False, allow_upload=False,
                                     trust_code=False,
                                     curve=ServerCurve(server_keys, frozenset({self._client_keys.public}))))
        self._thread = threading.Thread(target=self.worker.serve, name="diffsplit-replica-worker",
                                        daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Connection] = OrderedDict()
        self._cancels: dict[tuple[str, str], threading.Event] = {}

    def forward(self, client: str, message: bytes) -> bytes:
        """One request of ``client`` (a packed envelope) run by this replica's worker; its packed reply."""
        limits = self.worker.config.settings.limits
        header = unpack_message(message, limits)
        request_id = header.get("request_id")
        key = (client, request_id if isinstance(request_id, str) else "")
        cancel = threading.Event()
        connection = self._connection(client)
        with self._lock:
            self._cancels[key] = cancel
        try:
            reply = connection.client.request(header, cancel=cancel)
        except RequestCancelled:
            reply = error_reply(Cancelled(f"request {key[1]} was cancelled"))
        except (TransportError, ValueError) as exc:  # the replica's own worker is gone, or a reused id
            reply = error_reply(NodeFailed(f"the replica could not run the request: {exc}"))
        finally:
            with self._lock:
                self._cancels.pop(key, None)
                connection.in_flight -= 1
        return pack_message(reply, limits)

    def cancel(self, client: str, request_id: str) -> bool:
        """Cancel ``client``'s forwarded request ``request_id`` if it runs here (True then)."""
        with self._lock:
            event = self._cancels.get((client, request_id))
        if event is None:
            return False
        event.set()
        return True

    def ask(self, op: str) -> dict[str, Any]:
        """The reply body of the worker's ``stats`` or ``free``."""
        connection = self._connection("")
        try:
            reply = connection.client.request({"op": op}, timeout=30)
        finally:
            with self._lock:
                connection.in_flight -= 1
        return {key: value for key, value in reply.items() if key not in ("op", "request_id")}

    def close(self) -> None:
        with self._lock:
            connections, self._clients = list(self._clients.values()), OrderedDict()
        for connection in connections:
            connection.client.close()
        self.worker.stop()
        self._thread.join(timeout=self.worker.config.grace_s + 5)

    def _connection(self, name: str) -> _Connection:
        """``name``'s connection, counted in flight; idle ones beyond the limit are closed, never busy."""
        with self._lock:
            connection = self._clients.pop(name, None)
            if connection is None:
                connection = _Connection(Client(self.worker.endpoint, settings=self.worker.config.settings,
                                                curve=self._curve))
            connection.in_flight += 1
            self._clients[name] = connection
            idle = [key for key, known in self._clients.items() if known.in_flight == 0]
            surplus = max(0, len(self._clients) - MAX_CLIENTS_PER_REPLICA)
            evicted = [self._clients.pop(key) for key in idle[:surplus]]
        for old in evicted:
            old.client.close()
        return connection


class _Connection:
    """One client's connection to the replica's worker, and how many of its requests are under way."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.in_flight = 0


@dataclass(frozen=True)
class HeldRecipe:
    """What Serve's multiplexing keeps per model id: the replica's cache holds the models themselves."""

    model_id: str


def _replica_class(layout: ServeLayout, config: WorkerConfig) -> Any:
    """The deployment class, decorated for this layout."""

    ongoing = config.slots * config.batch_max + config.max_queue

    @serve.deployment(
        name=DEPLOYMENT_NAME, num_replicas=layout.replicas,
        ray_actor_options={"num_cpus": layout.cpus_per_replica, "num_gpus": layout.gpus_per_replica},
        max_ongoing_requests=ongoing,
    )
    class WorkerReplica:
        def __init__(self, replica_config: WorkerConfig) -> None:
            self.core = ReplicaCore(replica_config)
            #: a thread per request the replica may have under way (the event loop's default pool is smaller)
            self.threads = ThreadPoolExecutor(max_workers=ongoing, thread_name_prefix="diffsplit-replica")
            self.gathered.set_max_batch_size(max(1, min(replica_config.batch_max, MAX_GATHERED)))
            self.gathered.set_batch_wait_timeout_s(replica_config.batch_wait_ms / 1000)

        @serve.multiplexed(max_num_models_per_replica=layout.models_per_replica)
        async def holding(self, model_id: str) -> HeldRecipe:
            return HeldRecipe(model_id)

        async def __call__(self, call: tuple[str, bytes]) -> bytes:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.holding(model_id)  # this replica now counts as holding it: Serve routes it here
            return await self.gathered(call)

        # several gathered batches at once: a short call is not held behind a long batch
        @serve.batch(max_batch_size=MAX_GATHERED, batch_wait_timeout_s=0.01, max_concurrent_batches=ongoing)
        async def gathered(self, calls: list[tuple[str, bytes]]) -> list[bytes]:
            """Calls that arrived together go to the worker at once: its --batch-max gathers them."""
            loop = asyncio.get_running_loop()
            return list(await asyncio.gather(*(loop.run_in_executor(self.threads, self.core.forward, client,
                                                                    message) for client, message in calls)))

        async def cancel(self, client: str, request_id: str) -> bool:
            return self.core.cancel(client, request_id)

        async def stats(self) -> dict[str, Any]:
            return await asyncio.get_running_loop().run_in_executor(self.threads, self.core.ask, "stats")

        async def free(self) -> dict[str, Any]:
            return await asyncio.get_running_loop().run_in_executor(self.threads, self.core.ask, "free")

        def __del__(self) -> None:
            self.core.close()
            self.threads.shutdown(wait=False, cancel_futures=True)

    return WorkerReplica


def application_name() -> str:
    """A name of this front's own: two ``diffsplit serve`` on one cluster never replace each other."""
    return f"{APP_PREFIX}-{uuid.uuid4().hex[:12]}"


def start_application(name: str, replica_config: WorkerConfig, layout: ServeLayout) -> Any:
    """Deploy the replicas as application ``name`` (no HTTP proxy: clients come through the front); their
    deployment handle. The replicas get no CURVE key of the front's: each makes its own."""
    replica_config = replace(replica_config, curve=None)
    serve.start(proxy_location="Disabled")
    deployment = _replica_class(layout, replica_config)
    return serve.run(deployment.bind(replica_config), name=name, route_prefix=None)


def stop_application(name: str) -> None:
    """Remove application ``name`` if it was deployed (only it: other applications on the cluster stay)."""
    if name in serve.status().applications:
        serve.delete(name)


class ServeForwarder:
    """The front's ``forward``: a ``run_node`` request to a replica through the deployment handle."""

    def __init__(self, handle: Any, limits: Any) -> None:
        self.handle = handle
        self.limits = limits

    def __call__(self, request: Request, op: RunNode) -> Mapping[str, Any]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        # the peer's routing id names a connection; with CURVE the client's key names the client
        client = request.client_key or request.peer.hex()
        message = pack_message(request.header, self.limits)
        response = self.handle.options(multiplexed_model_id=model_id_of(op)).remote((client, message))
        while True:
            if request.cancelled.is_set():
                response.cancel()
                self._cancel_on_replicas(client, request.request_id)
                raise Cancelled(f"request {request.request_id} was cancelled")
            try:
                packed = response.result(timeout_s=POLL_S)
                break
            except TimeoutError:
                continue
            except RayServeException as exc:  # Serve's own refusals: backpressure, no replica yet
                raise Overloaded(f"Ray Serve refused the request: {ray_error_line(exc)}") from None
            except RayError as exc:
                raise NodeFailed(f"the Ray Serve replica failed: {ray_error_line(exc)}") from None
        return unpack_message(packed, self.limits)

    def _cancel_on_replicas(self, client: str, request_id: str) -> None:
        """Tell every replica: the one running the request stops it and frees its slot."""
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            found = self.handle.broadcast("cancel", client, request_id).results(timeout_s=10)
        except (RayError, RayServeException, TimeoutError) as exc:
            log.warning("could not pass the cancel of %s on to the replicas: %s", request_id, exc)
            return
        if not any(found):
            log.info("no replica was running %s when it was cancelled", request_id)

    def stats(self) -> dict[str, Any]:
        """Every replica's worker stats."""
        return {"replicas": self.handle.broadcast("stats").results(timeout_s=30)}

    def free(self) -> dict[str, Any]:
        """``free`` on every replica: what each dropped."""
        return {"replicas": self.handle.broadcast("free").results(timeout_s=30)}

