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
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from diffsplit.engine.worker_choice import recipe_digests
from diffsplit.remote.errors import Cancelled, NodeFailed, Overloaded
from diffsplit.remote.worker import Worker, WorkerConfig
from diffsplit.transport.errors import TransportError
from diffsplit.transport.packed import pack_message, unpack_message
from diffsplit.transport.server import Request
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import error_reply
from diffsplit.transport.worker_ops import RunNode

APP_NAME = "diffsplit"
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
    fair queue and client shares see the front's clients, not one client). Usable without Ray."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = Worker(replace(config, listen="tcp://127.0.0.1:*", curve=None, insecure=False,
                                     allow_upload=False, trust_code=False))
        self._thread = threading.Thread(target=self.worker.serve, name="diffsplit-replica-worker",
                                        daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, Client] = OrderedDict()

    def forward(self, client: str, message: bytes) -> bytes:
        """One request of ``client`` (a packed envelope) run by this replica's worker; its packed reply."""
        limits = self.worker.config.settings.limits
        header = unpack_message(message, limits)
        try:
            reply = self._client(client).request(header)
        except (TransportError, ValueError) as exc:  # the replica's own worker is gone, or a reused id
            reply = error_reply(NodeFailed(f"the replica could not run the request: {exc}"))
        return pack_message(reply, limits)

    def stats(self) -> dict[str, Any]:
        """The replica's worker's ``stats`` (cache, batching, device)."""
        reply = self._client("").request({"op": "stats"}, timeout=30)
        return {key: value for key, value in reply.items() if key not in ("op", "request_id")}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in clients:
            client.close()
        self.worker.stop()
        self._thread.join(timeout=self.worker.config.grace_s + 5)

    def _client(self, name: str) -> Client:
        with self._lock:
            client = self._clients.pop(name, None)
            if client is None:
                client = Client(self.worker.endpoint, settings=self.worker.config.settings)
            self._clients[name] = client
            crowded = len(self._clients) > MAX_CLIENTS_PER_REPLICA
            evicted = self._clients.popitem(last=False)[1] if crowded else None
        if evicted is not None:
            evicted.close()
        return client


@dataclass(frozen=True)
class HeldRecipe:
    """What Serve's multiplexing keeps per model id: the replica's cache holds the models themselves."""

    model_id: str


def _replica_class(layout: ServeLayout, config: WorkerConfig) -> Any:
    """The deployment class, decorated for this layout."""

    @serve.deployment(
        name=DEPLOYMENT_NAME, num_replicas=layout.replicas,
        ray_actor_options={"num_cpus": layout.cpus_per_replica, "num_gpus": layout.gpus_per_replica},
        max_ongoing_requests=config.slots * config.batch_max + config.max_queue,
    )
    class WorkerReplica:
        def __init__(self, replica_config: WorkerConfig) -> None:
            self.core = ReplicaCore(replica_config)
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

        @serve.batch(max_batch_size=MAX_GATHERED, batch_wait_timeout_s=0.01)
        async def gathered(self, calls: list[tuple[str, bytes]]) -> list[bytes]:
            """Calls that arrived together go to the worker at once: its --batch-max gathers them."""
            return list(await asyncio.gather(*(asyncio.to_thread(self.core.forward, client, message)
                                                for client, message in calls)))

        async def stats(self) -> dict[str, Any]:
            return await asyncio.to_thread(self.core.stats)

        def __del__(self) -> None:
            self.core.close()

    return WorkerReplica


def start_application(replica_config: WorkerConfig, layout: ServeLayout) -> Any:
    """Deploy the replicas (no HTTP proxy: clients come through the front); their deployment handle."""
    serve.start(proxy_location="Disabled")
    deployment = _replica_class(layout, replica_config)
    return serve.run(deployment.bind(replica_config), name=APP_NAME, route_prefix=None)


def stop_application() -> None:
    serve.delete(APP_NAME)
    serve.shutdown()


class ServeForwarder:
    """The front's ``forward``: a ``run_node`` request to a replica through the deployment handle."""

    def __init__(self, handle: Any, limits: Any) -> None:
        self.handle = handle
        self.limits = limits

    def __call__(self, request: Request, op: RunNode) -> Mapping[str, Any]:
        from ray.exceptions import RayError

        client = request.client_key or request.peer.hex()
        message = pack_message(request.header, self.limits)
        response = self.handle.options(multiplexed_model_id=model_id_of(op)).remote((client, message))
        while True:
            if request.cancelled.is_set():
                response.cancel()
                raise Cancelled(f"request {request.request_id} was cancelled")
            try:
                packed = response.result(timeout_s=POLL_S)
                break
            except TimeoutError:
                continue
            except RayError as exc:
                raise NodeFailed(f"the Ray Serve replica failed: {_first_line(exc)}") from None
            except RuntimeError as exc:  # Serve's own refusals (the application is gone, backpressure)
                raise Overloaded(f"Ray Serve refused the request: {_first_line(exc)}") from None
        return unpack_message(packed, self.limits)

    def stats(self) -> dict[str, Any]:
        """Every replica's worker stats."""
        return {"replicas": self.handle.broadcast("stats").results(timeout_s=30)}


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
