"""One log line per request the worker answers, and the counts ``status`` reports about clients.

The worker tells the :class:`RequestLog` when a request arrives, when a slot
starts it and when its final reply leaves (or is dropped); the log then
writes one record to the ``diffsplit.remote.ops`` logger at INFO: op, client,
request id, node class, outcome (``ok`` or the error kind), seconds queued
and running, and the payload bytes of both messages (tensors and binary
values; the wire adds a small header). ``diffsplit worker`` prints these as
text, or as JSON lines with ``--log-json`` (see ``log_format``). Each
record's fields travel as ``record.ops`` (a dict) for formatters. Texts a
peer chose (op, request id, node class) are logged escaped and cut short.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffsplit.engine.lru import LruTable
from diffsplit.engine.value_walk import iter_values
from diffsplit.transport.server import Request
from diffsplit.transport.shown import SHOWN_CHARS, shown
from diffsplit.transport.worker_errors import error_from_reply, is_error_reply

#: The logger of request lines and other operational events (unloads); INFO level.
OPS_LOGGER = "diffsplit.remote.ops"
#: Clients remembered for the ``known`` count (the least recently seen go first).
MAX_KNOWN_CLIENTS = 4096
#: Requests tracked at once; beyond this the oldest lose their timing (their replies then go unlogged).
MAX_TRACKED_REQUESTS = 65536
#: The outcome of a request whose reply was sent.
OK = "ok"
#: The outcome of a request whose result was dropped because the client had cancelled it.
CANCELLED = "cancelled"
#: The outcome of a request whose reply could not be handed to the socket.
UNSENT = "unsent"


#: How deep and how many values ``payload_bytes`` looks at (a peer's header could be anything).
MAX_WALK_DEPTH = 32
MAX_WALK_VALUES = 100_000


def payload_bytes(value: Any) -> int:
    """Bytes of the tensors and binary values in a message header (a bounded walk)."""
    total = 0
    for item in iter_values(value, max_depth=MAX_WALK_DEPTH, max_values=MAX_WALK_VALUES):
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, bytes | bytearray):
            total += len(item)
        elif isinstance(item, memoryview):
            total += item.nbytes
    return total


def clean(text: str) -> str:
    """A peer's text as it may appear in a log line: printable, no spaces, at most ~80 characters."""
    if len(text) <= SHOWN_CHARS and text.isprintable() and " " not in text and text:
        return text
    return shown(text)


def client_label(request: Request) -> str:
    """A short, stable name of the client: ``key:`` and 8 characters of its CURVE public key when it
    authenticated, else ``peer:`` and the hex of its ZeroMQ routing id. Never a secret."""
    if request.client_key:
        return f"key:{request.client_key[:8]}"
    return f"peer:{request.peer.hex()}"


def node_class(request: Request) -> str | None:
    """The node class a ``run_node`` request names, else None."""
    node = request.header.get("node")
    if isinstance(node, Mapping) and isinstance(node.get("class_type"), str):
        return clean(str(node["class_type"]))
    return None


def outcome_of(reply: Mapping[str, Any]) -> str:
    """``ok`` for a result, the error's kind for an error reply."""
    return error_from_reply(reply).kind if is_error_reply(reply) else OK


@dataclass(frozen=True)
class RequestRecord:
    """What one log line says about one request."""

    op: str
    client: str
    request_id: str
    node: str | None
    outcome: str
    queue_s: float
    run_s: float
    bytes_in: int
    bytes_out: int | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (a JSON line's body)."""
        return {"event": "request", **dataclasses.asdict(self)}

    def text(self) -> str:
        """``op=run_node client=peer:… id=… node=KSampler outcome=ok queue_s=0.001 run_s=0.250 …``."""
        parts = [f"op={self.op}", f"client={self.client}", f"id={self.request_id}"]
        if self.node is not None:
            parts.append(f"node={self.node}")
        parts += [f"outcome={self.outcome}", f"queue_s={self.queue_s:.3f}", f"run_s={self.run_s:.3f}"]
        parts.append(f"bytes_in={self.bytes_in}")
        if self.bytes_out is not None:
            parts.append(f"bytes_out={self.bytes_out}")
        return " ".join(parts)


@dataclass(frozen=True)
class ClientCounts:
    """Clients as ``status`` reports them."""

    #: clients with a request in flight or one sent within the last ``connected_s`` seconds
    connected: int
    #: distinct clients seen since the worker started (at most MAX_KNOWN_CLIENTS)
    known: int


@dataclass(frozen=True)
class RequestCounts:
    """Requests answered since the worker started."""

    total: int
    errors: int


@dataclass
class _Timing:
    received: float
    client: str
    bytes_in: int
    started: float | None = None


@dataclass
class _Client:
    last_seen: float
    in_flight: int = 0


class RequestLog:
    """Times each request from arrival to reply and writes one record per request; thread-safe."""

    def __init__(
        self,
        *,
        logger: logging.Logger | None = None,
        connected_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger(OPS_LOGGER)
        self.connected_s = connected_s
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: LruTable[tuple[bytes, str], _Timing] = LruTable(max_entries=MAX_TRACKED_REQUESTS)
        self._clients: LruTable[str, _Client] = LruTable(max_entries=MAX_KNOWN_CLIENTS)
        self._total = 0
        self._errors = 0

    def received(self, request: Request) -> None:
        """``request`` arrived (call once, before it is queued or handled)."""
        now = self._clock()
        client = client_label(request)
        size = payload_bytes(request.header)
        with self._lock:
            for gone in self._requests.put((request.peer, request.request_id), _Timing(now, client, size)):
                self._forget_locked(gone.key, gone.value)
            known = self._clients.get(client)
            if known is None:
                known = _Client(now)
                self._clients.put(client, known)  # the least recently seen goes beyond MAX_KNOWN_CLIENTS
            known.last_seen = now
            known.in_flight += 1

    def started(self, request: Request) -> None:
        """A slot started working on ``request`` (its queue time ends here)."""
        with self._lock:
            timing = self._requests.peek((request.peer, request.request_id))
            if timing is not None and timing.started is None:
                timing.started = self._clock()

    def finished(
        self, request: Request, outcome: str, reply: Mapping[str, Any] | None = None
    ) -> RequestRecord | None:
        """The final ``reply`` left (None: nothing left): write the record. None when already logged."""
        now = self._clock()
        with self._lock:
            timing = self._requests.pop((request.peer, request.request_id))
            if timing is None:
                return None
            self._forget_locked((request.peer, request.request_id), timing)
            self._total += 1
            if outcome != OK:
                self._errors += 1
        started = timing.started if timing.started is not None else timing.received
        record = RequestRecord(
            op=clean(request.op), client=timing.client, request_id=clean(request.request_id),
            node=node_class(request), outcome=outcome, queue_s=started - timing.received, run_s=now - started,
            bytes_in=timing.bytes_in, bytes_out=None if reply is None else payload_bytes(reply),
        )
        self.logger.info("%s", record.text(), extra={"ops": record.to_dict()})
        return record

    def clients(self) -> ClientCounts:
        """How many clients are connected now and how many were seen."""
        now = self._clock()
        with self._lock:
            connected = sum(1 for c in self._clients.values()
                            if c.in_flight > 0 or now - c.last_seen <= self.connected_s)
            return ClientCounts(connected=connected, known=len(self._clients))

    def counts(self) -> RequestCounts:
        """Requests answered so far, and how many of them with an error."""
        with self._lock:
            return RequestCounts(total=self._total, errors=self._errors)

    def _forget_locked(self, key: tuple[bytes, str], timing: _Timing) -> None:
        """The request is no longer in flight (the lock is held)."""
        client = self._clients.peek(timing.client)
        if client is not None:
            client.in_flight = max(0, client.in_flight - 1)
            client.last_seen = self._clock()
