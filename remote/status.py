"""The worker's ``status`` reply: what is loaded and how busy it is, as plain data.

Read-only and safe to show anyone who can connect: model names are the
store-relative file names recipes carry, clients are counted, not named, and
no path or key appears.
"""

from __future__ import annotations

from typing import Any

from diffsplit.remote.cache import ModelCache
from diffsplit.remote.request_log import RequestLog

from diffsplit import __version__


def status_report(
    *,
    cache: ModelCache,
    requests: RequestLog,
    queue_length: int,
    max_queue: int,
    busy_slots: int,
    slots: int,
    idle_unload_s: float | None,
    uptime_s: float,
    authenticates_clients: bool,
) -> dict[str, Any]:
    """The ``status`` op's reply body."""
    stats = cache.stats()
    clients = requests.clients()
    counts = requests.counts()
    return {
        "version": __version__,
        "uptime_s": uptime_s,
        "models": [model.to_dict() for model in reversed(cache.models())],  # most recently used first
        "cache": {
            "bytes": stats.bytes, "budget_bytes": stats.budget_bytes, "entries": stats.entries,
            "hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions,
            "unloaded": stats.unloaded, "idle_unload_s": idle_unload_s, "too_large": stats.too_large,
        },
        "queue": {"length": queue_length, "max": max_queue},
        "slots": {"busy": busy_slots, "total": slots},
        "clients": {"connected": clients.connected, "known": clients.known,
                    "authenticated": authenticates_clients},
        "requests": {"total": counts.total, "errors": counts.errors},
    }
