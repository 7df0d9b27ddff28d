"""Bounded text for what a peer sent: quotes and error messages never grow with the input.

Any value a peer sent (a dtype, a shape, an op name, a key) is quoted in an
error with ``shown``; any message or traceback that goes back on the wire is
cut with ``clip``. So an error reply is small whatever provoked it, and the
logs cannot be flooded or garbled (``shown`` escapes control characters).
"""

from __future__ import annotations

import reprlib
from typing import Any

#: The longest quote of a peer's value in an error message, in characters.
SHOWN_CHARS = 80
#: The longest error message sent to a peer, in characters.
MAX_MESSAGE_CHARS = 2048
#: The longest traceback text sent to a peer, in characters.
MAX_TRACEBACK_CHARS = 16384

_BINARY = (bytes, bytearray, memoryview)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters; a cut text ends saying how long it was."""
    if len(text) <= limit:
        return text
    mark = f"… [{len(text)} chars, cut]"
    if len(mark) >= limit:
        return text[:limit]
    return text[: limit - len(mark)] + mark


def _repr_of(limit: int) -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxstring = short.maxother = short.maxlong = max(limit, 8)
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 8
    short.maxdeque = short.maxarray = 8
    return short


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without reading all of a huge value."""
    if isinstance(value, _BINARY):
        view = memoryview(value).cast("B") if isinstance(value, memoryview) else memoryview(value)
        text = repr(bytes(view[:limit]))
        if len(view) > limit or len(text) > limit:
            size = f"… ({len(view)} bytes)"
            text = text[: max(limit - len(size), 0)] + size
    else:
        text = _repr_of(limit).repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
