"""Sending one file to a worker in chunks: a store file a worker lacks, or a file named by content.

The client side of the ``upload`` op (``transport.worker_ops.UploadChunk``):
chunks of ``UPLOAD_CHUNK_BYTES`` in order, each its own frame, the last marked
``final`` (the worker then checks the whole file's sha256). Both clients use it:
graph runs for store files after ``MissingModel`` (``engine.offload``) and
``diffsplit.offload`` for adapters sent by content (``engine.call_offload``).
"""

from __future__ import annotations

from typing import BinaryIO

from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_errors import error_from_reply, is_error_reply
from diffsplit.transport.worker_ops import UploadChunk

UPLOAD_CHUNK_BYTES = 32 << 20


class FileShrank(Exception):
    """The file ended before the size it was announced with (it changed while being sent)."""


def send_file(
    client: Client, stream: BinaryIO, *, folder: str, name: str, sha256: str, total_bytes: int,
    content: bool = False, timeout_s: float | None = None,
) -> None:
    """Send ``total_bytes`` of ``stream`` as ``folder/name``; the worker's typed error if it refuses a chunk.

    FileShrank when the stream ends early; TransportError when the connection fails.
    """
    offset = 0
    while True:
        data = bytearray(stream.read(UPLOAD_CHUNK_BYTES))
        if not data and offset < total_bytes:
            raise FileShrank(f"{name} ended after {offset} of {total_bytes} bytes while it was sent")
        final = offset + len(data) >= total_bytes
        chunk = UploadChunk(folder=folder, name=name, sha256=sha256, total_bytes=total_bytes, offset=offset,
                            data=data, final=final, content=content)
        reply = client.request(chunk.header(), timeout=timeout_s)
        if is_error_reply(reply):
            raise error_from_reply(reply)
        offset += len(data)
        if final:
            return
