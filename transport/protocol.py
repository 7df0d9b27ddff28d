"""The conversation on top of the envelope: reserved ops, heartbeats, settings.

Every header carries ``"op"`` (a string) and ``"request_id"`` (a string of at
most ``MAX_REQUEST_ID_CHARS``). Reserved ops:

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

The defaults (a beat every 0.5 s, gone after 2.5 s of silence) report a dead
worker within about 3 s: five missed beats, well clear of a busy worker, whose
I/O thread beats whatever its handlers do. Workers wait longer for silent
clients (``WORKER_SETTINGS``): cancelling a client's job costs more than
holding it a little longer.

Large messages: beats queue behind a message on the same connection, so
while one is under way the other side hears nothing. A client therefore adds
the time its requests take to send at ``min_transfer_rate`` to the timeout,
and a server precedes a final reply of more than ``ANNOUNCE_BYTES`` with a
``progress`` message carrying ``incoming_bytes`` (the reply's size), for which
the client waits as long again. Announcements never reach ``on_progress``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import zmq
from diffsplit.transport.envelope import DEFAULT_LIMITS, INLINE_THRESHOLD, Limits, encode
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, SHOWN_CHARS, clip

OP_HEARTBEAT = "heartbeat"
OP_CANCEL = "cancel"
OP_PROGRESS = "progress"
OP_ERROR = "error"
#: The longest request id a server accepts (it is echoed in every reply, so it must stay small).
MAX_REQUEST_ID_CHARS = 256
#: A final reply larger than this is announced first (``incoming_bytes`` in a ``progress`` message).
ANNOUNCE_BYTES = 1 << 20
#: The announcement's field: the size of the reply that follows.
INCOMING_BYTES = "incoming_bytes"


@dataclass(frozen=True)
class Settings:
    """Limits, tensor framing and heartbeat timing (seconds) shared by both ends."""

    limits: Limits = DEFAULT_LIMITS
    inline_threshold: int = INLINE_THRESHOLD
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.5
    #: bytes/s: the slowest link assumed while a large message is under way (1 MiB/s = 8 Mbit/s)
    min_transfer_rate: float = float(1 << 20)

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if not self.min_transfer_rate > 0:
            raise ValueError("need min_transfer_rate > 0")

    def transfer_s(self, size_bytes: int) -> float:
        """How long a message of ``size_bytes`` may take on the slowest link assumed."""
        return size_bytes / self.min_transfer_rate


DEFAULT_SETTINGS = Settings()
#: A worker's side: beats as often as a client's, cancels a silent client's jobs after 10 s.
WORKER_SETTINGS = Settings(heartbeat_timeout=10.0)
#: How many beats fit in a timeout that ``settings_for_timeout`` chooses (at most 0.5 s apart).
_BEATS_PER_TIMEOUT = 5


def settings_for_timeout(heartbeat_timeout: float, base: Settings = DEFAULT_SETTINGS) -> Settings:
    """``base`` with this ``heartbeat_timeout`` and a beat at most 0.5 s apart, five per timeout."""
    if not heartbeat_timeout > 0:
        raise ValueError(f"a heartbeat timeout must be more than 0 s, not {heartbeat_timeout}")
    interval = min(DEFAULT_SETTINGS.heartbeat_interval, heartbeat_timeout / _BEATS_PER_TIMEOUT)
    return replace(base, heartbeat_interval=interval, heartbeat_timeout=heartbeat_timeout)


def heartbeat() -> list[bytes | memoryview]:
    """The parts of one heartbeat message."""
    return encode({"op": OP_HEARTBEAT, "request_id": None})


def error_message(request_id: str | None, kind: str, message: str) -> list[bytes | memoryview]:
    """The parts of a transport-level ``error`` reply, small whatever the texts.

    ``kind`` is cut to ``SHOWN_CHARS`` and ``message`` to ``MAX_MESSAGE_CHARS``
    characters; a ``request_id`` over ``MAX_REQUEST_ID_CHARS`` (which the server
    never accepts) is sent as None.
    """
    if request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS:
        request_id = None
    error = {"kind": clip(kind, SHOWN_CHARS), "message": clip(message, MAX_MESSAGE_CHARS)}
    return encode({"op": OP_ERROR, "request_id": request_id, "error": error})


def open_socket(context: zmq.Context[Any], kind: int, limits: Limits) -> zmq.Socket[Any]:
    """A socket with linger 0 whose peers may not send frames over ``limits.max_total_bytes``."""
    sock: zmq.Socket[Any] = context.socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_total_bytes)  # libzmq drops peers that send more
    return sock
