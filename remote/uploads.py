"""Receiving a model file a client uploads after a MissingModel reply (``--allow-upload``).

What peers may upload is bounded:

- only files the loaders read without unpickling: ``.safetensors`` (and its
  ``.sft`` spelling) into a model folder, ``.yaml`` into ``configs/`` (read with
  ``yaml.safe_load``); pickled ``.ckpt``/``.pt``/``.pth``/``.bin`` files are never
  taken from a peer;
- straight into one of the store's model folders, ``<models>/<folder>/<name>``:
  no sub-folders, never into a model directory (one holding
  ``model_index.json`` or ``config.json``), never replacing a file;
- per client, at most ``max_partials_per_client`` unfinished uploads, declaring
  at most ``max_client_bytes`` together; an unfinished upload idle for
  ``idle_s`` is dropped and its temporary file deleted;
- one upload per file at a time: while one client sends a sha256 or a target
  name, another client's upload of the same is refused (it never truncates
  the first);
- a declared size over ``max_file_bytes``, or over the disk's free space less
  what unfinished uploads still need, is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from diffsplit.engine.store import FOLDER_EXTENSIONS, MODEL_FOLDERS, is_model_directory, unsafe_name_reason
from diffsplit.remote.errors import BadRequest, Overloaded
from diffsplit.tracer.files import file_sha256 as _sha256_of
from diffsplit.tracer.recipe import is_sha256
from diffsplit.transport.worker_ops import UploadChunk

#: Weight files a loader reads without unpickling (safetensors); other folders' kinds in FOLDER_EXTENSIONS.
UPLOAD_EXTENSIONS = frozenset({".safetensors", ".sft"})
#: Disk space every upload leaves free besides what it declares.
DISK_RESERVE_BYTES = 64 << 20
#: The largest ``.yaml`` config an upload may carry (LDM configs are a few KB).
MAX_CONFIG_BYTES = 1 << 20
#: Where unfinished uploads are written, inside the store.
PARTS_FOLDER = ".uploads"


@dataclass(frozen=True)
class UploadLimits:
    """What peers may upload (see the module's description)."""

    max_file_bytes: int = 16 << 30
    max_partials_per_client: int = 2
    #: declared bytes of one client's unfinished uploads together; None: ``max_file_bytes``
    max_client_bytes: int | None = None
    idle_s: float = 600.0
    max_partials: int = 64
    #: files one client may install while this worker runs, and all clients together
    max_installed_per_client: int = 32
    max_installed: int = 256

    @property
    def client_bytes(self) -> int:
        """``max_client_bytes``, defaulting to one file's worth."""
        return self.max_file_bytes if self.max_client_bytes is None else self.max_client_bytes


def check_chunk(chunk: UploadChunk, max_file_bytes: int) -> UploadChunk:
    """``chunk`` if this worker may take it (folder, name, kind of file, size); BadRequest names why not."""
    if chunk.folder not in MODEL_FOLDERS:
        raise BadRequest(f"upload: {chunk.folder!r} is not a model folder ({', '.join(MODEL_FOLDERS)})")
    reason = unsafe_name_reason(chunk.name)
    if reason is not None:
        raise BadRequest(f"upload: name {chunk.name!r} {reason}")
    if "/" in chunk.name or chunk.name.startswith("."):
        raise BadRequest(f"upload: name {chunk.name!r} must be a plain file name: uploads go straight "
                         f"into {chunk.folder}/, never into a sub-folder or a hidden file (send the file "
                         "name alone)")
    allowed = FOLDER_EXTENSIONS.get(chunk.folder, UPLOAD_EXTENSIONS)
    if Path(chunk.name).suffix.lower() not in allowed:
        kinds = ", ".join(sorted(allowed))
        raise BadRequest(f"upload: {chunk.name!r}: a worker takes only {kinds} files into {chunk.folder}/ "
                         "(files it reads without unpickling); copy other files yourself")
    if not is_sha256(chunk.sha256):
        raise BadRequest("upload: sha256 must be 64 hex digits")
    if Path(chunk.name).suffix.lower() == ".yaml" and chunk.total_bytes > MAX_CONFIG_BYTES:
        raise BadRequest(f"upload: a config file is at most {MAX_CONFIG_BYTES} bytes")
    if not 0 <= chunk.total_bytes <= max_file_bytes:
        raise BadRequest(f"upload: {chunk.total_bytes} bytes is over the worker's limit of {max_file_bytes}")
    if chunk.offset < 0 or chunk.offset + len(chunk.data) > chunk.total_bytes:
        raise BadRequest("upload: chunk lies outside the declared file size")
    return chunk


@dataclass
class _Partial:
    """An unfinished upload: whose it is, what it declared, how far it got."""

    client: Hashable
    chunk: UploadChunk  # the first chunk (its folder, name, sha256 and size bind the rest)
    part: Path
    received: int
    last_seen: float
    busy: bool = False

    def matches(self, chunk: UploadChunk) -> bool:
        first = self.chunk
        return (first.folder, first.name, first.sha256, first.total_bytes) == (
            chunk.folder, chunk.name, chunk.sha256, chunk.total_bytes)


class UploadReceiver:
    """Writes chunks to ``<root>/.uploads/<sha256>.part``; the final chunk checks and installs."""

    def __init__(
        self, root: Path, limits: UploadLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root = root
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._partials: dict[str, _Partial] = {}  # by sha256
        self._installed: dict[Hashable, int] = {}  # files installed per client since start
        for stale in (root / PARTS_FOLDER).glob("*.part"):  # a part cannot resume after a restart
            stale.unlink(missing_ok=True)

    def receive(self, chunk: UploadChunk, client: Hashable) -> Path | None:
        """Apply one chunk from ``client``; returns the installed file's path after the final one."""
        check_chunk(chunk, self.limits.max_file_bytes)
        self._check_target(chunk)
        with self._lock:
            self._expire_locked(self._clock())
            partial = self._claim(chunk, client)
        try:
            with partial.part.open("r+b") as stream:
                stream.seek(chunk.offset)
                stream.write(chunk.data)
            installed = self._install(partial) if chunk.final else None
        except BaseException:
            with self._lock:
                self._drop(partial)
            raise
        with self._lock:
            if chunk.final:
                self._drop(partial)
                self._installed[client] = self._installed.get(client, 0) + 1
            else:
                partial.received += len(chunk.data)
                partial.last_seen = self._clock()
                partial.busy = False
        return installed

    def expire(self) -> int:
        """Drop unfinished uploads idle for ``idle_s`` (their files too); how many were dropped."""
        with self._lock:
            return self._expire_locked(self._clock())

    def unfinished(self, client: Hashable = None) -> int:
        """How many uploads are under way (of ``client`` when given)."""
        with self._lock:
            return sum(1 for p in self._partials.values() if client is None or p.client == client)

    def _expire_locked(self, now: float) -> int:
        idle = [p for p in self._partials.values() if not p.busy and now - p.last_seen > self.limits.idle_s]
        for partial in idle:
            self._drop(partial)
        return len(idle)

    def _claim(self, chunk: UploadChunk, client: Hashable) -> _Partial:
        """The partial this chunk continues (or starts), marked busy; BadRequest when it may not."""
        same_target = (p for p in self._partials.values() if p.chunk.target == chunk.target)
        existing = self._partials.get(chunk.sha256) or next(same_target, None)
        if existing is not None and (existing.client != client or existing.busy):
            raise BadRequest(
                f"upload: another upload of {existing.chunk.target} (sha256 {existing.chunk.sha256[:12]}…) "
                f"is under way; try again when it is done (an abandoned one is dropped after "
                f"{self.limits.idle_s:g} s idle)")
        if chunk.offset == 0:
            if existing is not None:  # the same client starts over
                self._drop(existing)
            partial = self._start(chunk, client)
        else:
            if existing is None or not existing.matches(chunk):
                raise BadRequest(f"upload of {chunk.target}: no upload of this file is under way from this "
                                 "client (or it declared another name or size); start again at offset 0")
            if existing.received != chunk.offset:
                raise BadRequest(f"upload of {chunk.target}: chunks must arrive in order: expected offset "
                                 f"{existing.received}, got {chunk.offset}")
            partial = existing
        partial.busy = True
        partial.last_seen = self._clock()
        return partial

    def _start(self, chunk: UploadChunk, client: Hashable) -> _Partial:
        limits = self.limits
        mine = [p for p in self._partials.values() if p.client == client]
        idle = f"(an unfinished upload is dropped after {limits.idle_s:g} s idle)"
        if len(mine) >= limits.max_partials_per_client:
            raise BadRequest(f"upload: this client already has {len(mine)} unfinished upload(s), the most "
                             f"this worker allows; finish them first {idle}")
        declared = sum(p.chunk.total_bytes for p in mine) + chunk.total_bytes
        if declared > limits.client_bytes:
            raise BadRequest(f"upload: this client's unfinished uploads would declare {declared} bytes, "
                             f"over the worker's limit of {limits.client_bytes} per client; finish them "
                             f"first {idle}")
        installed = self._installed.get(client, 0)
        if installed >= limits.max_installed_per_client:
            raise BadRequest(f"upload: this client has installed {installed} files on this worker, the most "
                             "it allows until it restarts")
        if sum(self._installed.values()) >= limits.max_installed:
            raise Overloaded(f"upload: {sum(self._installed.values())} files were uploaded to this worker, "
                             "the most it takes until it restarts")
        if len(self._partials) >= limits.max_partials:
            raise Overloaded(f"upload: {len(self._partials)} uploads are under way on this worker; try later")
        parts = self.root / PARTS_FOLDER
        parts.mkdir(parents=True, exist_ok=True)
        owed = sum(p.chunk.total_bytes - p.received for p in self._partials.values())
        room = shutil.disk_usage(parts).free - owed - DISK_RESERVE_BYTES
        if chunk.total_bytes > room:
            raise BadRequest(f"upload: {chunk.target} ({chunk.total_bytes} bytes) does not fit on the "
                             f"worker's disk ({max(room, 0)} bytes free for uploads)")
        part = parts / f"{chunk.sha256}.part"
        part.write_bytes(b"")
        declared_only = dataclasses.replace(chunk, data=b"", offset=0, final=False)  # keeps no chunk bytes
        partial = _Partial(client, declared_only, part, received=0, last_seen=self._clock())
        self._partials[chunk.sha256] = partial
        return partial

    def _drop(self, partial: _Partial) -> None:
        if self._partials.get(partial.chunk.sha256) is partial:
            del self._partials[partial.chunk.sha256]
        partial.part.unlink(missing_ok=True)

    def _check_target(self, chunk: UploadChunk) -> None:
        """BadRequest when ``chunk``'s file may not land at ``<root>/<folder>/<name>``."""
        folder = self.root / chunk.folder
        target = folder / chunk.name
        if not target.resolve().is_relative_to(self.root.resolve()):
            raise BadRequest(f"upload: {chunk.target} would land outside the store")
        if is_model_directory(folder):
            raise BadRequest(f"upload: {chunk.folder}/ is a model directory; nothing is uploaded into one")
        if target.is_dir() or (target.is_symlink() and not target.exists()):
            raise BadRequest(f"upload: {chunk.target} exists and is not a file; not replaced")
        if target.is_file() and target.stat().st_size != chunk.total_bytes:
            raise BadRequest(f"upload: {chunk.target} exists with other content; not replaced")

    def _install(self, partial: _Partial) -> Path:
        chunk = partial.chunk
        part = partial.part
        size = part.stat().st_size
        if size != chunk.total_bytes or _sha256_of(part) != chunk.sha256:
            raise BadRequest(f"upload of {chunk.name!r}: content does not match its sha256; discarded")
        self._check_target(chunk)
        target = self.root / chunk.folder / chunk.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(part, target)  # fails if the name exists: an upload never replaces a model
        except FileExistsError:
            if target.is_file() and _sha256_of(target) == chunk.sha256:
                return target
            raise BadRequest(f"upload: {chunk.target} exists with other content; not replaced") from None
        return target
