"""A whole envelope as one bytes object, for carriers that move one blob per message (Ray's object store).

The parts of :func:`diffsplit.transport.envelope.encode` are framed with msgpack
(an array of byte strings); unpacking checks the framing and then decodes the
envelope with its usual limits. Nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
from diffsplit.transport import envelope
from diffsplit.transport.errors import MalformedMessage
from diffsplit.transport.limits import DEFAULT_LIMITS, Limits


def pack_message(header: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """``header`` (tensors anywhere) as one bytes object; UnsupportedType/MessageTooLarge as ``encode``."""
    parts = envelope.encode(header, limits)
    packed: bytes = msgpack.packb([bytes(part) for part in parts], use_bin_type=True)
    return packed


def unpack_message(packed: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The header :func:`pack_message` packed; MalformedMessage/MessageTooLarge for anything else."""
    if not isinstance(packed, bytes | bytearray | memoryview):
        raise MalformedMessage(f"a packed message is bytes, not {type(packed).__name__}")
    try:
        parts = msgpack.unpackb(packed, raw=False, use_list=True, max_bin_len=len(packed),
                                max_array_len=limits.max_frames + 3, max_map_len=0, max_str_len=0,
                                max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"not a packed diffsplit message: {exc}") from None
    if not isinstance(parts, list) or not all(isinstance(part, bytes) for part in parts):
        raise MalformedMessage("a packed message is an array of byte strings")
    return envelope.decode(parts, limits)
