"""``diffsplit worker status ADDR`` and ``diffsplit worker free ADDR``: ask a running worker.

``status`` prints the models the worker has cached (names and sizes), its
cache use against the budget, queue length, busy slots and clients;
``free`` makes it drop every cached model no running job uses and prints
what went. Both take ``--json`` and the client options every command that
talks to workers takes (``--curve``, ``--server-key``, ``--heartbeat-timeout``;
or the ``DIFFSPLIT_CURVE_*`` environment variables). Importing this module
is cheap: ZeroMQ loads only when a command runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from diffsplit.arg_types import positive_seconds
from diffsplit.client_args import add_client_arguments, client_options
from diffsplit.transport.errors import DiffsplitError

#: How long a control command waits for the worker's reply by default.
DEFAULT_TIMEOUT_S = 10.0


class WorkerRefused(DiffsplitError):
    """The worker answered the control request with an error (the message says why)."""


def add_control_parsers(worker: argparse.ArgumentParser) -> None:
    """The ``status`` and ``free`` actions under ``diffsplit worker`` (without one it is the daemon)."""
    actions = worker.add_subparsers(dest="worker_command", metavar="ACTION", required=False,
                                    title="asking a running worker (instead of starting one)")
    status = actions.add_parser("status", help="what a running worker has loaded and how busy it is")
    free = actions.add_parser("free", help="make a running worker drop every cached model no job uses")
    for parser in (status, free):
        parser.add_argument("address", metavar="ADDR", help="the worker, e.g. tcp://127.0.0.1:5555")
        parser.add_argument("--json", action="store_true", help="print the worker's reply as JSON")
        parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                            help=f"wait at most S seconds for the reply (default {DEFAULT_TIMEOUT_S:g})")
        add_client_arguments(parser)


def ask(address: str, op: str, args: argparse.Namespace) -> dict[str, Any]:
    """Send ``op`` to the worker at ``address`` and return its result (WorkerRefused on an error reply)."""
    from diffsplit.transport.pool import shared_pool
    from diffsplit.transport.worker_errors import error_from_reply, is_error_reply
    from diffsplit.transport.worker_ops import simple_request

    options = client_options(args)
    with shared_pool().lease(address, settings=options.settings, curve=options.curve) as client:
        reply = client.request(simple_request(op), timeout=args.timeout)
    if is_error_reply(reply):
        error = error_from_reply(reply)
        raise WorkerRefused(f"the worker at {address} refused {op}: {error.kind}: {error.message}")
    return reply


def command(args: argparse.Namespace) -> int:
    """Run ``diffsplit worker status|free``; prints text or ``--json``."""
    if args.worker_command == "status":
        reply = ask(args.address, "status", args)
        status = reply.get("status")
        if not isinstance(status, Mapping):
            raise WorkerRefused(f"the worker at {args.address} sent no status (an older diffsplit?)")
        print(json.dumps(status, indent=2) if args.json else format_status(args.address, status))
        return 0
    reply = ask(args.address, "free", args)
    body = {key: reply.get(key) for key in ("freed", "kept", "freed_bytes")}
    print(json.dumps(body, indent=2) if args.json else format_free(args.address, body))
    return 0


def human_bytes(count: float) -> str:
    """``1.5 MiB``, ``812 B``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _models_lines(models: Any) -> list[str]:
    lines = []
    for model in models if isinstance(models, list) else []:
        if not isinstance(model, Mapping):
            continue
        state = "in use" if model.get("in_use") else f"idle {float(model.get('idle_s', 0.0)):.1f} s"
        size = human_bytes(float(model.get("bytes", 0)))
        lines.append(f"  {size:>10}  {model.get('name', '?')}  ({state})")
    return lines


def format_status(address: str, status: Mapping[str, Any]) -> str:
    """The status reply as a few lines of text."""
    cache = status.get("cache") or {}
    queue = status.get("queue") or {}
    slots = status.get("slots") or {}
    clients = status.get("clients") or {}
    requests = status.get("requests") or {}
    idle = cache.get("idle_unload_s")
    used, budget = human_bytes(float(cache.get("bytes", 0))), human_bytes(float(cache.get("budget_bytes", 0)))
    uptime = float(status.get("uptime_s", 0))
    lines = [
        f"worker {address}: diffsplit {status.get('version', '?')}, up {uptime:.0f} s",
        f"slots: {slots.get('busy', 0)} busy of {slots.get('total', 0)}; "
        f"queue: {queue.get('length', 0)} waiting (at most {queue.get('max', 0)})",
        f"clients: {clients.get('connected', 0)} connected, {clients.get('known', 0)} known"
        + (" (CURVE allow-list)" if clients.get("authenticated") else ""),
        f"requests: {requests.get('total', 0)} answered, {requests.get('errors', 0)} with an error",
        f"cache: {used} of {budget}, {cache.get('entries', 0)} model(s); "
        f"hits {cache.get('hits', 0)}, misses {cache.get('misses', 0)}, "
        f"evicted {cache.get('evictions', 0)}, unloaded {cache.get('unloaded', 0)}"
        + (f"; idle models unload after {float(idle):g} s" if idle else ""),
    ]
    models = _models_lines(status.get("models"))
    lines += models if models else ["  (no models cached)"]
    return "\n".join(lines)


def format_free(address: str, body: Mapping[str, Any]) -> str:
    """The free reply as text: what went, what stayed because a job uses it."""
    freed, kept = body.get("freed") or [], body.get("kept") or []
    freed_bytes = human_bytes(float(body.get("freed_bytes") or 0))
    lines = [f"worker {address}: freed {len(freed)} model(s), {freed_bytes}"]
    lines += _models_lines(freed)
    if kept:
        lines.append(f"kept {len(kept)} model(s) a running job uses:")
        lines += _models_lines(kept)
    return "\n".join(lines)
