"""Control ops on a worker: who may free its cache, what ``free`` does and says, unload log lines.

``free`` drops every cached model that no running job uses. It changes the
worker's state, so it is accepted only from a client the worker can name: an
allow-listed CURVE client when the worker authenticates clients, otherwise
any client of a worker that listens on loopback only (``ipc://``,
``127.0.0.0/8``, ``::1``: only this machine's users reach it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from diffsplit.remote.cache import CachedModel, ModelCache, release_memory
from diffsplit.remote.errors import BadRequest
from diffsplit.remote.exposure import is_loopback_endpoint
from diffsplit.transport.server import Request


def may_control(request: Request, endpoint: str, *, authenticates_clients: bool) -> None:
    """Raise BadRequest unless ``request`` may use a control op (``free``) on this worker."""
    if authenticates_clients:
        if not request.authenticated:
            raise BadRequest("free is accepted only from allow-listed CURVE clients (--curve-clients)")
        return
    if not is_loopback_endpoint(endpoint):
        raise BadRequest(
            "free is refused: this worker listens beyond loopback and does not authenticate clients; "
            "start it with --curve-secret and --curve-clients to accept free from the listed clients"
        )


def free_reply(cache: ModelCache, logger: logging.Logger) -> dict[str, Any]:
    """Free the unused models now and describe it: ``freed`` and ``kept`` (in use) models, bytes freed."""
    result = cache.free_unused()
    if result.freed:
        release_memory()
    logger.info("free: %d model(s), %d bytes freed, %d kept in use", len(result.freed), result.freed_bytes,
                len(result.kept), extra={"ops": {
                    "event": "free", "freed": [model.name for model in result.freed],
                    "freed_bytes": result.freed_bytes, "kept": [model.name for model in result.kept]}})
    return {
        "op": "result",
        "freed": [model.to_dict() for model in result.freed],
        "kept": [model.to_dict() for model in result.kept],
        "freed_bytes": result.freed_bytes,
    }


def log_unloads(logger: logging.Logger, models: Sequence[CachedModel]) -> None:
    """One line per model the idle check dropped."""
    for model in models:
        logger.info("unloaded %s (%d bytes) after %.1f s idle", model.name, model.bytes, model.idle_s,
                    extra={"ops": {"event": "unload", "name": model.name, "bytes": model.bytes,
                                   "idle_s": model.idle_s}})
