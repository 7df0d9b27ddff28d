"""One connection pool per process: every part of a client talks to a worker through it.

Graph runs (``engine.offload.RemoteRunner``), ``diffsplit.offload`` and
``@diffsplit.node`` calls (``engine.call_offload``), profiles and the worker
control commands lease their :class:`~diffsplit.transport.sockets.Client` here:
one ZeroMQ context for the process, one connection (one I/O thread, one CURVE
handshake) per worker address, settings and keys, shared by everyone who asks
for the same. A lease is given back with :meth:`Lease.release` (or a ``with``
block); a connection nobody leases is kept ``keep_s`` seconds for the next
lease, then closed by the next pool call (or :meth:`ClientPool.close_idle`).
:meth:`ClientPool.discard` closes a connection for everyone at once (a worker
that fell silent: nothing queued for it reaches a restarted one).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from diffsplit.transport.auth import ClientCurve
from diffsplit.transport.protocol import DEFAULT_SETTINGS, Settings
from diffsplit.transport.sockets import Client

#: How long a connection nobody leases stays open for the next lease.
KEEP_S = 30.0


@dataclass(frozen=True)
class _Key:
    endpoint: str
    settings: Settings
    curve: ClientCurve | None


@dataclass
class _Slot:
    client: Client
    leases: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class Lease:
    """One holder's use of a pooled client; :meth:`release` gives it back (idempotent)."""

    def __init__(self, pool: ClientPool, key: _Key, client: Client) -> None:
        self._pool = pool
        self._key = key
        self.client = client
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Give the client back to the pool (it stays open for the next lease a while)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._pool._give_back(self._key, self.client)

    def __enter__(self) -> Client:
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ClientPool:
    """Clients by (endpoint, settings, CURVE keys) on one ZeroMQ context. Thread-safe.

    ``clock`` (seconds, monotonic) times idle connections; ``keep_s`` is how long one is kept.
    """

    def __init__(self, *, keep_s: float = KEEP_S, clock: Callable[[], float] = time.monotonic) -> None:
        if keep_s < 0:
            raise ValueError(f"keep_s must be >= 0, not {keep_s}")
        self.keep_s = keep_s
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[_Key, _Slot] = {}
        self._context: zmq.Context[Any] | None = None
        self._socket_left_open = False  # a client's I/O thread did not stop: never term() the context

    def lease(self, endpoint: str, *, settings: Settings = DEFAULT_SETTINGS,
              curve: ClientCurve | None = None) -> Lease:
        """A lease on the client for ``endpoint`` with ``settings`` and ``curve`` (connected on first use).

        TransportError when it cannot connect (a malformed endpoint, bad keys).
        """
        key = _Key(endpoint, settings, curve)
        self._close_expired()
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.client.closed:
                del self._slots[key]  # its I/O failed or someone closed it: connect again
                slot = None
            if slot is None:
                if self._context is None:
                    self._context = zmq.Context()
                slot = _Slot(Client(endpoint, settings=settings, curve=curve, context=self._context))
                self._slots[key] = slot
            slot.leases += 1
            return Lease(self, key, slot.client)

    def discard(self, client: Client) -> None:
        """Close ``client`` for every holder now (their waiting requests fail) and forget it."""
        with self._lock:
            for key, slot in list(self._slots.items()):
                if slot.client is client:
                    del self._slots[key]
        self._closed(client)

    def close_idle(self) -> int:
        """Close every connection nobody leases now; how many were closed."""
        return self._close_where(lambda slot, _now: slot.leases <= 0)

    def close(self) -> None:
        """Close every connection (leased ones too: their holders' requests fail) and the context."""
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
            context, self._context = self._context, None
        for slot in slots:
            self._closed(slot.client)
        if context is not None and not self._socket_left_open:  # a socket left open would block term()
            context.term()

    def connections(self) -> int:
        """How many connections are open (leased or kept)."""
        with self._lock:
            return len(self._slots)

    def _give_back(self, key: _Key, client: Client) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.client is client:
                slot.leases -= 1
                if slot.leases <= 0:
                    slot.idle_since = self._clock()
        self._close_expired()

    def _close_expired(self) -> None:
        self._close_where(lambda slot, now: slot.leases <= 0 and now - slot.idle_since >= self.keep_s)

    def _close_where(self, closes: Callable[[_Slot, float], bool]) -> int:
        with self._lock:
            now = self._clock()
            gone = [(key, slot) for key, slot in self._slots.items() if closes(slot, now)]
            for key, _slot in gone:
                del self._slots[key]
        for _key, slot in gone:
            self._closed(slot.client)
        return len(gone)

    def _closed(self, client: Client) -> None:
        if not client.close():
            self._socket_left_open = True


_shared: ClientPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ClientPool:
    """The process's pool (made on first use, closed when the interpreter exits)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ClientPool()
            atexit.register(_shared.close)
        return _shared
