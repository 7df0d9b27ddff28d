"""The envelope codec: nested Python data and tensors <-> ZeroMQ multipart.

One message is ``[MAGIC, VERSION, header, *frames]``:

- ``header`` is two msgpack objects back to back: the *tensor table* (one
  descriptor ``[kind, dtype, shape, loc]`` per tensor, where ``loc`` is a frame
  index or the inline bytes) and then the *body* (the caller's dict).
- In the body a tensor is an ext value holding its table index; a tuple is an
  array whose first item is the tuple marker ext (so it comes back a tuple).
- Tensors of at least ``inline_threshold`` bytes travel as their own frames,
  straight from their memory (no copy); smaller ones ride inline in the table.

Decoding checks every limit and the whole table before it builds any tensor,
so a lying header costs nothing. Nothing is ever unpickled: msgpack with
string map keys only, two known ext types, anything else is MalformedMessage.
The same tensor object appearing twice is sent once and decodes to one object.
Decoded tensors share memory with the received frames (see
``tensors.from_bytes`` for when a copy is made); in-process, decoding the
output of ``encode`` therefore aliases the original tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from diffsplit.transport import codec
from diffsplit.transport.digest import content_digest
from diffsplit.transport.errors import MalformedMessage, MessageTooLarge, UnsupportedType
from diffsplit.transport.limits import DEFAULT_LIMITS, Limits, check_sizes
from diffsplit.transport.tensors import from_bytes

MAGIC = b"DSPL"
VERSION = b"\x01"
INLINE_THRESHOLD = 64 * 1024
"""Tensors of at least this many bytes travel as their own frame."""

__all__ = [
    "DEFAULT_LIMITS",
    "INLINE_THRESHOLD",
    "MAGIC",
    "VERSION",
    "EnvelopeStats",
    "Limits",
    "content_digest",
    "decode",
    "describe",
    "encode",
]


@dataclass(frozen=True)
class EnvelopeStats:
    """Sizes of one encoded message: wire bytes against raw tensor bytes."""

    header_bytes: int
    frame_bytes: int
    tensor_bytes: int  # raw bytes of every tensor, framed or inline
    inline_tensor_bytes: int  # the part of tensor_bytes riding inside the header
    n_frames: int

    @property
    def wire_bytes(self) -> int:
        """Every byte of the multipart message, magic and version included."""
        return len(MAGIC) + len(VERSION) + self.header_bytes + self.frame_bytes

    @property
    def overhead_bytes(self) -> int:
        """Wire bytes that are not tensor payload."""
        return self.wire_bytes - self.tensor_bytes


def encode(
    header: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS, *, inline_threshold: int = INLINE_THRESHOLD
) -> list[bytes | memoryview]:
    """Encode a dict (nested data, tensors and arrays anywhere) as multipart parts.

    Large tensors are returned as memoryviews of their own memory (CUDA tensors
    are copied to the CPU, non-contiguous ones made contiguous first): do not
    modify them until the message has been sent. Raises UnsupportedType (naming
    the path of the offending value) and MessageTooLarge.
    """
    if not isinstance(header, Mapping):
        raise UnsupportedType(f"a header must be a dict, not {type(header).__name__}")
    encoder = codec.Encoder(inline_threshold)
    try:
        body = encoder.convert(header)
        packed = codec.pack(encoder.table) + codec.pack(body)
    except codec.Unsupported as exc:
        raise UnsupportedType(exc.message()) from None
    except RecursionError:
        raise UnsupportedType("header nests too deeply (or contains a cycle)") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise UnsupportedType(f"cannot pack header: {exc}") from None
    check_sizes(len(packed), [len(f) for f in encoder.frames], limits)
    return [MAGIC, VERSION, packed, *encoder.frames]


def _byte_view(part: Any) -> memoryview:
    view = memoryview(part)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _split(parts: Sequence[Any], limits: Limits) -> tuple[memoryview, list[memoryview]]:
    """Check magic, version and sizes; nothing is copied or allocated."""
    if len(parts) < 3:
        raise MalformedMessage(f"a message has at least 3 parts (magic, version, header), got {len(parts)}")
    magic, version = _byte_view(parts[0]), _byte_view(parts[1])
    if len(magic) != len(MAGIC) or magic != MAGIC:
        raise MalformedMessage("not a diffsplit message (bad magic)")
    if len(version) != len(VERSION) or version != VERSION:
        shown = version.tobytes() if len(version) <= 8 else f"{len(version)} bytes"
        raise MalformedMessage(f"unsupported envelope version {shown!r} (this side speaks {VERSION!r})")
    if len(parts) - 3 > limits.max_frames:
        raise MessageTooLarge(f"{len(parts) - 3} tensor frames exceed Limits.max_frames={limits.max_frames}")
    header = _byte_view(parts[2])
    frames = [_byte_view(p) for p in parts[3:]]
    check_sizes(len(header), [len(f) for f in frames], limits)
    return header, frames


def decode(parts: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode multipart parts (``zmq.Frame``s, bytes or memoryviews) into the header dict.

    Raises MessageTooLarge or MalformedMessage before building any tensor.
    Tensors rebuilt from writable ``zmq.Frame``s share their memory and keep
    the frame alive; read-only parts (``bytes``) and inline tensors are copied.
    """
    header, frames = _split(parts, limits)
    decoder = codec.Decoder()
    unpacker = codec.make_unpacker(header, limits, decoder)
    descriptors = codec.validate_table(codec.unpack_next(unpacker, "the tensor table"), frames, limits)
    decoder.objects = [from_bytes(d.kind, d.dtype, d.shape, d.data) for d in descriptors]
    body = codec.unpack_next(unpacker, "the header body")
    if unpacker.tell() != len(header):
        raise MalformedMessage(f"{len(header) - unpacker.tell()} trailing bytes after the header body")
    if type(body) is not dict:
        raise MalformedMessage(f"the header body is a {type(body).__name__}, not a map")
    if len(decoder.used) != len(descriptors):
        unused = len(descriptors) - len(decoder.used)
        raise MalformedMessage(f"{unused} tensors in the table are not referenced by the body")
    return body


def describe(
    message: Mapping[str, Any] | Sequence[Any],
    limits: Limits = DEFAULT_LIMITS,
    *,
    inline_threshold: int = INLINE_THRESHOLD,
) -> EnvelopeStats:
    """Sizes of a message: pass a header dict (it is encoded) or encoded parts (only the table is read)."""
    if isinstance(message, Mapping):
        parts: Sequence[Any] = encode(message, limits, inline_threshold=inline_threshold)
    else:
        parts = message
    header, frames = _split(parts, limits)
    table = codec.unpack_next(codec.make_unpacker(header, limits, codec.Decoder()), "the tensor table")
    descriptors = codec.validate_table(table, frames, limits)
    return EnvelopeStats(
        header_bytes=len(header),
        frame_bytes=sum(len(f) for f in frames),
        tensor_bytes=sum(len(d.data) for d in descriptors),
        inline_tensor_bytes=sum(len(d.data) for d in descriptors if not d.in_frame),
        n_frames=len(frames),
    )
