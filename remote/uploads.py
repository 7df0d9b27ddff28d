"""Receiving a model file a client uploads after a MissingModel reply (``--allow-upload``)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsplit.engine.store import MODEL_FOLDERS, unsafe_name_reason
from diffsplit.remote.errors import BadRequest
from diffsplit.tracer.files import file_sha256 as _sha256_of

_SHA256_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class UploadChunk:
    """One piece of an upload, as the request header carries it."""

    folder: str
    name: str
    sha256: str
    total_bytes: int
    offset: int
    data: bytes
    final: bool


def _whole_number(value: object) -> int:
    """A header's byte count: an int, never a float, string or bool a peer might send instead."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected a whole number, got {type(value).__name__}")
    return value


def parse_chunk(header: dict[str, object], max_file_bytes: int) -> UploadChunk:
    """Validate an ``upload`` request header; BadRequest names what is wrong."""
    try:
        chunk = UploadChunk(
            folder=str(header["folder"]), name=str(header["name"]), sha256=str(header["sha256"]).lower(),
            total_bytes=_whole_number(header["total_bytes"]), offset=_whole_number(header["offset"]),
            data=_chunk_bytes(header["data"]), final=bool(header["final"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"upload: malformed header ({exc})") from None
    if chunk.folder not in MODEL_FOLDERS:
        raise BadRequest(f"upload: {chunk.folder!r} is not a model folder ({', '.join(MODEL_FOLDERS)})")
    reason = unsafe_name_reason(chunk.name)
    if reason is not None:
        raise BadRequest(f"upload: name {chunk.name!r} {reason}")
    if len(chunk.sha256) != 64 or not set(chunk.sha256) <= _SHA256_HEX:
        raise BadRequest("upload: sha256 must be 64 hex digits")
    if not 0 <= chunk.total_bytes <= max_file_bytes:
        raise BadRequest(f"upload: {chunk.total_bytes} bytes is over the worker's limit of {max_file_bytes}")
    if chunk.offset < 0 or chunk.offset + len(chunk.data) > chunk.total_bytes:
        raise BadRequest("upload: chunk lies outside the declared file size")
    return chunk


def _chunk_bytes(data: object) -> bytes:
    """A chunk arrives as a uint8 tensor (its own frame) or, when small, as bytes."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError("chunk data must be a 1-D uint8 tensor")
        return data.numpy().tobytes()
    if isinstance(data, bytes):
        return data
    raise TypeError(f"chunk data is a {type(data).__name__}")


class UploadReceiver:
    """Writes chunks to ``<root>/.uploads/<sha256>.part``; the final chunk checks and installs."""

    def __init__(self, root: Path, max_file_bytes: int) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        for stale in (root / ".uploads").glob("*.part"):  # a part cannot resume after a restart
            stale.unlink(missing_ok=True)

    def receive(self, header: dict[str, object]) -> Path | None:
        """Apply one chunk; returns the installed file's path after the final one."""
        chunk = parse_chunk(header, self.max_file_bytes)
        part = self.root / ".uploads" / f"{chunk.sha256}.part"
        with self._lock:
            part.parent.mkdir(parents=True, exist_ok=True)
            if chunk.offset == 0:
                part.write_bytes(b"")
            elif not part.exists() or part.stat().st_size != chunk.offset:
                raise BadRequest("upload: chunks must arrive in order, starting at offset 0")
            with part.open("ab") as stream:
                stream.write(chunk.data)
            if not chunk.final:
                return None
            return self._install(part, chunk)

    def _install(self, part: Path, chunk: UploadChunk) -> Path:
        size = part.stat().st_size
        if size != chunk.total_bytes or _sha256_of(part) != chunk.sha256:
            part.unlink(missing_ok=True)
            raise BadRequest(f"upload of {chunk.name!r}: content does not match its sha256; discarded")
        target = self.root / chunk.folder / chunk.name
        if not target.resolve().is_relative_to(self.root.resolve()):
            part.unlink(missing_ok=True)
            raise BadRequest(f"upload: {chunk.name!r} would land outside the store")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(part, target)  # fails if the name exists: an upload never replaces a model
        except FileExistsError:
            part.unlink(missing_ok=True)
            if target.is_file() and _sha256_of(target) == chunk.sha256:
                return target
            existing = f"{chunk.folder}/{chunk.name}"
            raise BadRequest(f"upload: {existing} exists with other content; not replaced") from None
        part.unlink(missing_ok=True)
        return target
