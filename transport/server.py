"""Server: a ROUTER that hands requests to handler threads and sends their replies.

See ``protocol`` for the ops and the heartbeat rules. The Server owns one
socket, touched only by its I/O thread, which also sends heartbeats to every
client with unanswered requests, so a handler may work for as long as it needs
without any heartbeat duty. ``recv``, ``reply`` and ``progress`` are
thread-safe: several handler threads may share one Server. Messages the
server cannot read are answered with a transport-level ``error`` and never
reach ``recv``. Nothing a client sends stops the I/O thread: any failure
while handling one message becomes a small error reply (or, if even that
fails, a logged and dropped message). Should the thread die anyway (a bug in
its timers, the socket), ``failure`` says why and ``recv`` raises.

The worker daemon builds on this::

    with Server("tcp://0.0.0.0:5555", curve=...) as server:
        while running:
            request = server.recv(timeout=1.0)
            if request is not None:
                pool.submit(handle, request)   # handle() calls server.reply(request, {...})
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
from diffsplit.transport.auth import ServerCurve, configure_server
from diffsplit.transport.envelope import decode, encode
from diffsplit.transport.errors import TransportError
from diffsplit.transport.iothread import IOThread
from diffsplit.transport.protocol import (
    ANNOUNCE_BYTES,
    DEFAULT_SETTINGS,
    INCOMING_BYTES,
    MAX_REQUEST_ID_CHARS,
    OP_CANCEL,
    OP_HEARTBEAT,
    OP_PROGRESS,
    Settings,
    error_message,
    heartbeat,
    open_socket,
)
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, clip, shown

log = logging.getLogger(__name__)

_CLOSED = object()  # wakes threads blocked in recv() when the server closes


@dataclass(frozen=True)
class Request:
    """One request as the server received it.

    ``cancelled`` is set when the client cancels the request or falls silent
    for the heartbeat timeout; handlers of long jobs should check it.
    """

    request_id: str
    op: str
    header: dict[str, Any]
    peer: bytes  # the ROUTER routing id of the client
    client_key: str | None  # Z85 public key of an allow-listed CURVE client, else None
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @property
    def authenticated(self) -> bool:
        """True when the client proved a key on the server's allow-list (CURVE + ZAP)."""
        return self.client_key is not None


class Server:
    """A ROUTER bound to ``endpoint`` (``tcp://HOST:*`` picks a free port; see ``.endpoint``).

    ``on_cancel`` hears of each request whose ``cancelled`` the client's cancel or its silence set:
    it runs on the I/O thread, after the event is set, so it must not block (a failure is logged,
    what it returns is ignored).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:*",
        *,
        settings: Settings = DEFAULT_SETTINGS,
        curve: ServerCurve | None = None,
        context: zmq.Context[Any] | None = None,
        on_cancel: Callable[[Request], object] | None = None,
    ) -> None:
        self.settings = settings
        self._on_cancel = on_cancel
        self.is_authenticated = curve is not None and curve.authenticates_clients
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: dict[bytes, dict[str, Request]] = {}
        self._last_heard: dict[bytes, float] = {}
        self._closed = False
        sock = open_socket(self._context, zmq.ROUTER, settings.limits)
        self._authenticator = None
        try:
            if curve is not None:
                self._authenticator = configure_server(sock, curve, self._context)
            sock.bind(endpoint)
        except TransportError:
            self._abort(sock)
            raise
        except zmq.ZMQError as exc:
            self._abort(sock)
            raise TransportError(f"cannot bind {endpoint}: {exc}") from exc
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._io = IOThread(
            sock,
            name=f"diffsplit-server {self.endpoint}",
            tick=settings.heartbeat_interval,
            on_message=self._on_message,
            on_tick=self._on_tick,
            on_failure=lambda exc: self._inbox.put(_CLOSED),
        )
        self._io.start()

    def _abort(self, sock: zmq.Socket[Any]) -> None:
        sock.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._own_context:
            self._context.term()

    @property
    def failure(self) -> BaseException | None:
        """Why the I/O thread stopped on its own (the server is then closed for good), else None."""
        return self._io.failure

    def recv(self, timeout: float | None = None) -> Request | None:
        """The next request, or None after ``timeout`` seconds. Raises TransportError once closed."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._inbox.put(_CLOSED)  # wake the next waiter too
            failure = self._io.failure
            raise TransportError("server closed" + (f" (I/O failed: {failure!r})" if failure else ""))
        return cast(Request, item)

    def reply(self, request: Request, header: Mapping[str, Any]) -> None:
        """Send the final reply (``header["op"]``, default ``"result"``; not progress/heartbeat).

        If encoding fails (UnsupportedType, MessageTooLarge) nothing is sent and
        the request stays open: reply again, with an error.
        """
        op = header.get("op", "result")
        if not isinstance(op, str) or op in (OP_PROGRESS, OP_HEARTBEAT, OP_CANCEL):
            raise ValueError(f"a final reply needs a str op other than progress/heartbeat/cancel, got {op!r}")
        parts = self._encode({**header, "op": op}, request)
        size = sum(memoryview(part).nbytes for part in parts[1:])
        with self._lock:
            self._pending.get(request.peer, {}).pop(request.request_id, None)
        if size > ANNOUNCE_BYTES:  # the client's beats wait behind it: say how long it will be silent
            self._io.post(self._encode({"op": OP_PROGRESS, INCOMING_BYTES: size}, request))
        self._io.post(parts)

    def progress(self, request: Request, header: Mapping[str, Any] | None = None) -> None:
        """Send an interim ``progress`` message for ``request``."""
        self._io.post(self._encode({**(header or {}), "op": OP_PROGRESS}, request))

    def _encode(self, header: dict[str, Any], request: Request) -> list[Any]:
        header["request_id"] = request.request_id
        parts = encode(header, self.settings.limits, inline_threshold=self.settings.inline_threshold)
        return [request.peer, *parts]

    def close(self) -> None:
        """Stop the I/O thread and close the socket (linger 0); ``recv`` raises afterwards. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stopped = self._io.stop()
        self._inbox.put(_CLOSED)
        with self._lock:
            for requests in self._pending.values():
                for request in requests.values():
                    request.cancelled.set()
            self._pending.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._own_context and stopped:
            self._context.term()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # I/O thread below.

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handle one message; nothing in it may stop the I/O thread (every failure is answered or logged)."""
        peer = frames[0].bytes
        self._last_heard[peer] = time.monotonic()
        try:
            header = decode(frames[1:], self.settings.limits)
        except Exception as exc:  # TransportError, or a decoder bug: either way the sender hears why
            if not isinstance(exc, TransportError):
                log.exception("decoding a message from a client failed")
            log.warning("unreadable message from a client: %s", clip(str(exc), MAX_MESSAGE_CHARS))
            self._send_error(peer, None, type(exc).__name__, str(exc))
            return
        request_id = header.get("request_id")
        reply_id = request_id if isinstance(request_id, str) else None
        try:
            self._accept(peer, header, frames[1])
        except Exception as exc:  # a bug in handling one message must not take the server down
            log.exception("handling a message from a client failed")
            self._send_error(peer, reply_id, "ServerError",
                             f"the server failed on this message: {type(exc).__name__}: {exc}")

    def _accept(self, peer: bytes, header: dict[str, Any], first: zmq.Frame) -> None:
        op, request_id = header.get("op"), header.get("request_id")
        if isinstance(op, str) and op == OP_HEARTBEAT:  # str first: an array's == does not give a bool
            return
        if not isinstance(op, str) or not isinstance(request_id, str):
            reply_id = request_id if isinstance(request_id, str) else None
            message = "a request needs a str 'op' and a str 'request_id'"
            self._send_error(peer, reply_id, "BadRequest", message)
            return
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            message = (f"a request_id of {len(request_id)} chars is over the {MAX_REQUEST_ID_CHARS} "
                       "this server accepts")
            self._send_error(peer, None, "BadRequest", message)
            return
        with self._lock:
            requests = self._pending.setdefault(peer, {})
            if op == OP_CANCEL:
                cancelled = requests.pop(request_id, None)
                if cancelled is not None:
                    cancelled.cancelled.set()
            elif request_id in requests:
                log.warning("duplicate request id %s from one client: ignored", shown(request_id))
                return
            else:
                request = Request(request_id, op, header, peer, self._client_key(first))
                requests[request_id] = request
        if op == OP_CANCEL:
            self._tell_cancelled([cancelled] if cancelled is not None else [])
            return
        self._inbox.put(request)

    def _tell_cancelled(self, requests: list[Request]) -> None:
        """``on_cancel`` for each request (outside the lock: it may reply); its failures are logged."""
        callback = self._on_cancel
        if callback is None:
            return
        for request in requests:
            try:
                callback(request)
            except Exception:  # the owner's bug: the I/O thread goes on
                log.exception("on_cancel failed for request %s", shown(request.request_id))

    def _send_error(self, peer: bytes, request_id: str | None, kind: str, message: str) -> None:
        """Queue a transport-level error reply (bounded in size); log and drop it if even that fails."""
        try:
            self._io.post([peer, *error_message(request_id, kind, message)])
        except Exception:  # the error reply itself failed: the message is dropped, the server goes on
            log.exception("could not send an error reply to a client")

    def _client_key(self, frame: zmq.Frame) -> str | None:
        if not self.is_authenticated:
            return None
        try:
            user = frame.get("User-Id")
            return user if isinstance(user, str) and user else None
        except zmq.ZMQError:
            return None

    def _on_tick(self, now: float) -> None:
        timeout = self.settings.heartbeat_timeout
        beat = []
        gone: list[Request] = []
        with self._lock:
            for peer, last in list(self._last_heard.items()):
                requests = self._pending.get(peer)
                if now - last <= timeout:
                    if requests:
                        beat.append(peer)
                    continue
                # Silent past the timeout: the client is gone; so are its requests.
                del self._last_heard[peer]
                for request in (self._pending.pop(peer, None) or {}).values():
                    request.cancelled.set()
                    gone.append(request)
        self._tell_cancelled(gone)
        for peer in beat:
            self._io.post([peer, *heartbeat()])
