"""Client: a DEALER that sends requests to one server and matches replies by id.

See ``protocol`` for the ops and the heartbeat rules. The Client owns one
socket, touched only by its I/O thread (``iothread.IOThread``), and by default
its own ZeroMQ context. All public methods are thread-safe; wait for each
request id from one thread. Encoding runs in the calling thread, decoding in
the I/O thread. Large tensors are sent zero-copy: do not modify a tensor you
passed to ``submit`` until its reply has arrived (or send a clone).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import zmq
from diffsplit.transport.auth import ClientCurve, configure_client
from diffsplit.transport.envelope import EnvelopeStats, decode, describe, encode
from diffsplit.transport.errors import PeerGone, Rejected, RequestCancelled, RequestTimeout, TransportError
from diffsplit.transport.iothread import IOThread
from diffsplit.transport.protocol import (
    DEFAULT_SETTINGS,
    INCOMING_BYTES,
    MAX_REQUEST_ID_CHARS,
    OP_CANCEL,
    OP_ERROR,
    OP_HEARTBEAT,
    OP_PROGRESS,
    Settings,
    heartbeat,
    open_socket,
)
from diffsplit.transport.server import Request, Server
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, shown

__all__ = ["Client", "Request", "Server", "Settings"]

log = logging.getLogger(__name__)

#: How often a waiting request checks its cancel event.
_CANCEL_POLL_S = 0.1


@dataclass
class _Waiting:
    inbox: queue.SimpleQueue[tuple[str, Any]]
    sent_at: float
    sent: EnvelopeStats
    done: bool = False  # a final reply or an error is in the inbox


@dataclass(frozen=True)
class Exchange:
    """A final reply and the sizes of both messages, as the encoder made and the socket received them."""

    reply: dict[str, Any]
    sent: EnvelopeStats
    received: EnvelopeStats


class Client:
    """A DEALER connected to one server; several requests may be outstanding at once."""

    def __init__(
        self,
        endpoint: str,
        *,
        settings: Settings = DEFAULT_SETTINGS,
        curve: ClientCurve | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self._last_heard = 0.0
        self._quiet_until = 0.0  # a large message is under way until then: silence is expected
        sock = open_socket(self._context, zmq.DEALER, settings.limits)
        try:
            self.public_key = configure_client(sock, curve).public if curve else None
            sock.connect(endpoint)
        except (zmq.ZMQError, TransportError) as exc:
            sock.close(linger=0)
            if self._own_context:
                self._context.term()
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from exc
        self._io = IOThread(
            sock,
            name=f"diffsplit-client {endpoint}",
            tick=settings.heartbeat_interval,
            on_message=self._on_message,
            on_tick=self._on_tick,
            on_failure=lambda exc: self._fail_all(lambda: TransportError(f"client I/O failed: {exc!r}")),
        )
        self._io.start()

    def submit(self, header: Mapping[str, Any]) -> str:
        """Send a request (``header["op"]`` required) and return its request id."""
        op = header.get("op")
        if not isinstance(op, str) or op in (OP_HEARTBEAT, OP_CANCEL):
            raise ValueError(f"a request needs a str op other than heartbeat/cancel, got {op!r}")
        request_id = header.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id must be a str of at most {MAX_REQUEST_ID_CHARS} chars, "
                             f"got {shown(request_id)}")
        parts = encode(
            {**header, "request_id": request_id},
            self.settings.limits,
            inline_threshold=self.settings.inline_threshold,
        )
        with self._lock:
            if request_id in self._waiting:
                raise ValueError(f"request id {request_id!r} is already outstanding")
            sent = describe(parts)
            now = time.monotonic()
            self._waiting[request_id] = _Waiting(queue.SimpleQueue(), now, sent)
            # the server beats for this request once it has all of it; until then it may be silent
            self._quiet_until = max(self._quiet_until, now) + self.settings.transfer_s(sent.wire_bytes)
        try:
            self._io.post(parts)
        except TransportError:
            with self._lock:
                self._waiting.pop(request_id, None)
            raise
        return request_id

    def result(
        self,
        request_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """The final reply of ``request_id`` (see :meth:`exchange_result`)."""
        return self.exchange_result(request_id, timeout, on_progress, cancel).reply

    def exchange_result(
        self,
        request_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Exchange:
        """Wait for the final reply of ``request_id``; progress messages go to ``on_progress``.

        When ``cancel`` is set while waiting, the request is cancelled on the
        server (it stops at its next step) and RequestCancelled is raised.

        Raises PeerGone when the server falls silent for ``heartbeat_timeout``,
        RequestTimeout after ``timeout`` seconds (the request is then cancelled),
        Rejected when the server could not read our messages. Wait for each
        request id from one thread only.
        """
        with self._lock:
            waiting = self._waiting.get(request_id)
        if waiting is None:
            raise KeyError(f"no outstanding request {request_id!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.cancel(request_id)
                raise RequestTimeout(f"no reply to {request_id} from {self.endpoint} within {timeout} s")
            if cancel is not None and cancel.is_set():
                self.cancel(request_id)
                raise RequestCancelled(f"request {request_id} to {self.endpoint} was cancelled")
            wait_s = remaining if cancel is None else min(_CANCEL_POLL_S, remaining or _CANCEL_POLL_S)
            try:
                kind, value = waiting.inbox.get(timeout=wait_s)
            except queue.Empty:
                continue
            if kind == OP_PROGRESS:
                if on_progress is not None:
                    on_progress(value)
                continue
            with self._lock:
                self._waiting.pop(request_id, None)
            if kind == "final":
                reply, received = value
                return Exchange(cast(dict[str, Any], reply), waiting.sent, received)
            raise value

    def request(
        self, header: Mapping[str, Any], timeout: float | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """``submit`` then ``result``."""
        return self.result(self.submit(header), timeout, **kwargs)

    def exchange(
        self, header: Mapping[str, Any], timeout: float | None = None, **kwargs: Any
    ) -> Exchange:
        """``submit`` then ``exchange_result``: the reply with both messages' sizes."""
        return self.exchange_result(self.submit(header), timeout, **kwargs)

    def cancel(self, request_id: str) -> None:
        """Forget a request and tell the server (a late reply is dropped)."""
        with self._lock:
            known = self._waiting.pop(request_id, None) is not None
        if known and self._io.alive:
            self._io.post(encode({"op": OP_CANCEL, "request_id": request_id}))

    def close(self) -> bool:
        """Stop the I/O thread, close the socket (linger 0); waiting requests fail. Idempotent.

        False when the I/O thread did not stop in time (its socket is left open: a context it
        shares must not be terminated, that would block).
        """
        stopped = self._io.stop()
        self._fail_all(lambda: TransportError(f"client of {self.endpoint} closed"))
        if self._own_context and stopped:
            self._context.term()
        return stopped

    @property
    def closed(self) -> bool:
        """Whether the client is closed, or its I/O thread failed (it sends nothing more)."""
        return not self._io.alive

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # I/O thread below.

    def _fail_all(self, make_error: Callable[[], Exception]) -> None:
        with self._lock:
            for waiting in self._waiting.values():
                if not waiting.done:
                    waiting.done = True
                    waiting.inbox.put(("error", make_error()))

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handle one message from the server; a failure fails the waiting requests, never the thread."""
        self._last_heard = time.monotonic()
        try:
            header = decode(frames, self.settings.limits)
        except TransportError as exc:
            kind, message = type(exc), f"unreadable message from {self.endpoint}: {exc}"
            self._fail_all(lambda: kind(message))
            return
        except Exception as exc:  # a decoder bug: the waiting requests hear of it, the thread goes on
            log.exception("decoding a message from %s failed", self.endpoint)
            failed = f"a message from {self.endpoint} could not be decoded: {type(exc).__name__}: {exc}"
            self._fail_all(lambda: TransportError(failed))
            return
        try:
            self._deliver(header, frames)
        except Exception as exc:
            log.exception("handling a message from %s failed", self.endpoint)
            failed = f"a message from {self.endpoint} could not be handled: {type(exc).__name__}: {exc}"
            self._fail_all(lambda: TransportError(failed))

    def _deliver(self, header: dict[str, Any], frames: list[zmq.Frame]) -> None:
        op, request_id = header.get("op"), header.get("request_id")
        if not isinstance(op, str):  # an array's == does not give a bool: a non-str op is just a reply
            op = None
        if op == OP_HEARTBEAT:
            return
        if op == OP_PROGRESS and INCOMING_BYTES in header:  # a large reply follows: silence until it is in
            size = header[INCOMING_BYTES]
            if isinstance(size, int) and size > 0:  # no more than a reply may be: a bogus size cannot mute us
                quiet_s = self.settings.transfer_s(min(size, self.settings.limits.max_total_bytes))
                with self._lock:
                    self._quiet_until = max(self._quiet_until, time.monotonic() + quiet_s)
            return
        if op == OP_ERROR and request_id is None:
            detail = shown(header.get("error"), MAX_MESSAGE_CHARS)
            self._fail_all(lambda: Rejected(f"{self.endpoint} could not read our message: {detail}"))
            return
        with self._lock:
            waiting = self._waiting.get(request_id) if isinstance(request_id, str) else None
            if waiting is None or waiting.done:
                return  # a late reply to a cancelled or timed-out request
            if op == OP_PROGRESS:
                waiting.inbox.put((OP_PROGRESS, header))
            else:
                received = describe(frames, self.settings.limits)  # before done: if it fails, waiters hear
                waiting.done = True
                waiting.inbox.put(("final", (header, received)))

    def _on_tick(self, now: float) -> None:
        timeout = self.settings.heartbeat_timeout
        with self._lock:
            waiting = [w for w in self._waiting.values() if not w.done]
            for w in waiting:
                silent = now - max(self._last_heard, w.sent_at)
                if now - max(self._last_heard, w.sent_at, self._quiet_until) > timeout:
                    w.done = True
                    w.inbox.put(("error", self._peer_gone(silent)))
        if waiting:
            self._io.post(heartbeat())

    def _peer_gone(self, silent: float) -> PeerGone:
        return PeerGone(
            f"no message from {self.endpoint} for {silent:.1f} s"
            f" (heartbeat_timeout={self.settings.heartbeat_timeout} s): the server died, froze or is"
            " unreachable, or the CURVE handshake failed (wrong server key, or this client's key"
            " is not on the server's allow-list)"
        )
