"""The root of every diffsplit exception, and the transport's own errors.

The root lives here because transport is the bottom layer: every other package
may import it, and it imports nothing of ours.
"""

from __future__ import annotations


class DiffsplitError(Exception):
    """Base class of every error diffsplit raises on purpose."""


class TransportError(DiffsplitError):
    """Something about the wire: a malformed message, a limit, a dead peer."""


class MessageTooLarge(TransportError):
    """A peer sent more than the configured limits allow."""


class MalformedMessage(TransportError):
    """A message does not follow the envelope format."""


class PeerGone(TransportError):
    """The peer stopped answering within its heartbeat or deadline."""


class UnsupportedType(TransportError, TypeError):
    """A value the envelope cannot carry (the message names where it sits)."""


class RequestTimeout(TransportError, TimeoutError):
    """A request got no final reply before its deadline (the peer was alive)."""


class RequestCancelled(TransportError):
    """The caller cancelled a request while waiting for its reply (the server was told)."""


class Rejected(TransportError):
    """The peer could not read a message we sent (limits or version differ)."""
