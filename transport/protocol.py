"""The conversation on top of the envelope: reserved ops, heartbeats, settings.

Every header carries ``"op"`` (a string) and ``"request_id"``. Reserved ops:

- ``heartbeat`` (either way, ``request_id`` None): "I am alive".
- ``cancel`` (client -> server): forget ``request_id``; sets ``Request.cancelled``.
- ``progress`` (server -> client): an interim message for ``request_id``.
- ``error`` with ``request_id`` None (server -> client): the server could not
  read a message at all; every waiting request of that client fails with
  Rejected. Any other op from the server is the *final* reply to its id (the
  worker's structured errors are ordinary final replies).

Liveness: a client with unanswered requests sends a heartbeat every
``heartbeat_interval``; a server holding unanswered requests of a client sends
that client a heartbeat every interval, from its I/O thread, whatever the
handlers are doing. A client that hears nothing for ``heartbeat_timeout``
fails its waiting requests with PeerGone (a dead, frozen or unreachable
server, or a CURVE handshake that failed); a server that hears nothing from a
client for that long sets the ``cancelled`` event of the client's requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq
from diffsplit.transport.envelope import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits, encode

OP_HEARTBEAT = "heartbeat"
OP_CANCEL = "cancel"
OP_PROGRESS = "progress"
OP_ERROR = "error"


@dataclass(frozen=True)
class Settings:
    """Limits, tensor framing and heartbeat timing (seconds) shared by both ends."""

    limits: Limits = DEFAULT_LIMITS
    inline_threshold: int = INLINE_THRESHOLD
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")


DEFAULT_SETTINGS = Settings()


def heartbeat() -> list[bytes | memoryview]:
    """The parts of one heartbeat message."""
    return encode({"op": OP_HEARTBEAT, "request_id": None})


def error_message(request_id: str | None, kind: str, message: str) -> list[bytes | memoryview]:
    """The parts of a transport-level ``error`` reply."""
    return encode({"op": OP_ERROR, "request_id": request_id, "error": {"type": kind, "message": message}})


def open_socket(context: zmq.Context[Any], kind: int, limits: Limits) -> zmq.Socket[Any]:
    """A socket with linger 0 whose peers may not send frames over ``limits.max_total_bytes``."""
    sock: zmq.Socket[Any] = context.socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_total_bytes)  # libzmq drops peers that send more
    return sock
