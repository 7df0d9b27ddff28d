"""One thread that alone touches one ZeroMQ socket.

ZeroMQ sockets are not thread-safe. ``IOThread`` takes a socket that the
constructing thread created and connected/bound, and from ``start()`` on only
its own thread uses it: it sends what other threads ``post`` (woken through a
local socket pair, so no polling delay), hands every received multipart
message to ``on_message`` and calls ``on_tick`` every ``tick`` seconds (the
heartbeat clock). Both callbacks run on the I/O thread and must not block.

A message whose ``on_message`` raises is logged and dropped: nothing a peer
sends ends the thread. Any other failure (``on_tick``, the socket) ends it:
``failure`` records why and ``on_failure`` is called, so owners and waiting
callers hear of it instead of hanging.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import socket as stdsocket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from diffsplit.transport.errors import TransportError

log = logging.getLogger(__name__)

_MAX_BATCH = 64  # messages received per loop turn before timers and sends get a look in
_BACKLOG_POLL_MS = 5  # retry interval while the socket refuses to take more (high-water mark)


class IOThread:
    """Owns ``sock`` once started; ``post`` and ``stop`` are safe from any thread."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        *,
        name: str,
        tick: float,
        on_message: Callable[[list[zmq.Frame]], None],
        on_tick: Callable[[float], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._sock = sock
        self._tick = tick
        self._on_message = on_message
        self._on_tick = on_tick
        self._on_failure = on_failure
        self._outbox: collections.deque[Sequence[Any]] = collections.deque()
        self._wake_r, self._wake_w = stdsocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def post(self, parts: Sequence[Any]) -> None:
        """Queue one multipart message for sending (zero-copy: keep its buffers unchanged)."""
        if threading.current_thread() is not self._thread and not self.alive:
            reason = f" ({self.failure!r})" if self.failure else ""
            raise TransportError(f"the connection is closed{reason}")
        self._outbox.append(parts)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):  # full: the thread is awake anyway
            self._wake_w.send(b"\0")

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread, then close the socket (linger 0) and the wake pair. Idempotent.

        Returns False if the thread did not stop in time (its socket is then left
        open, so the context must not be terminated: that would block).
        """
        self._stopping.set()
        if self._thread.is_alive():
            self._wake()
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %.1f s; leaving its socket open", self._thread.name, timeout)
            return False
        self._sock.close(linger=0)
        self._wake_r.close()
        self._wake_w.close()
        return True

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    # Read what came first: after this thread waited long for the GIL, beats may be
                    # queued unread, and the tick must not take their peer for silent.
                    self._receive()
                    self._on_tick(now)
                    next_tick = now + self._tick
                backlog = self._flush()
                wait = _BACKLOG_POLL_MS if backlog else max(0.0, next_tick - time.monotonic()) * 1000
                events = dict(poller.poll(math.ceil(wait)))
                if self._wake_r.fileno() in events:
                    self._drain_wake()
                if self._sock in events:
                    self._receive()
        except BaseException as exc:  # report, never vanish silently (SystemExit too): callers must hear
            log.exception("%s failed", self._thread.name)
            self.failure = exc
            self._stopping.set()
            try:
                self._on_failure(exc)
            except Exception:
                log.exception("%s: its failure callback failed too", self._thread.name)

    def _flush(self) -> bool:
        """Send queued messages; True when the socket refused some (retry soon)."""
        while self._outbox:
            try:
                self._sock.send_multipart(self._outbox[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            self._outbox.popleft()
        return False

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _receive(self) -> None:
        # bounded in count and in time, so a stream of slow messages cannot hold back the heartbeats
        until = time.monotonic() + self._tick / 2
        for _ in range(_MAX_BATCH):
            if time.monotonic() > until:
                return
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._on_message(frames)
            except Exception:  # one message must not end the thread: it is dropped, the loop goes on
                log.exception("%s: handling a received message failed; it was dropped", self._thread.name)
