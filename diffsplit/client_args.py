"""The options every command that talks to workers shares: CURVE keys and the heartbeat timeout.

``run``, ``profile`` and ``plan`` take ``--curve KEY`` (this client's
``.key_secret`` file), ``--server-key PUB`` (the worker's ``.key`` file or its
Z85 text) and ``--heartbeat-timeout S`` (a worker silent that long is gone).
Without the key options the ``DIFFSPLIT_CURVE_CLIENT_KEY`` and
``DIFFSPLIT_CURVE_SERVER_KEY`` environment variables apply. Importing this
module is cheap: it loads no keys and no ZeroMQ until a command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffsplit.arg_types import positive_seconds

if TYPE_CHECKING:
    from diffsplit.transport.auth import ClientCurve
    from diffsplit.transport.protocol import Settings


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to workers: message settings (heartbeats) and CURVE keys (None: plain)."""

    settings: Settings
    curve: ClientCurve | None


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--curve``, ``--server-key`` and ``--heartbeat-timeout`` on a command that talks to workers."""
    parser.add_argument("--curve", metavar="KEY",
                        help="this client's CURVE key pair (a NAME.key_secret file from "
                        "`diffsplit keys new`; default: $DIFFSPLIT_CURVE_CLIENT_KEY)")
    parser.add_argument("--server-key", metavar="PUB",
                        help="the worker's public CURVE key: its .key file or the 40-character Z85 text "
                        "(default: $DIFFSPLIT_CURVE_SERVER_KEY)")
    parser.add_argument("--heartbeat-timeout", type=positive_seconds, default=None, metavar="S",
                        help="report a worker that sends nothing for S seconds as gone "
                        "(default 2.5: a killed worker is noticed within about 3 s)")


#: The priorities a worker accepts (higher is served first; the same level is served round robin).
PRIORITY_RANGE = (-10, 10)


def priority(text: str) -> int:
    """``--priority``: an int in PRIORITY_RANGE."""
    low, high = PRIORITY_RANGE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
    return value


def add_priority_argument(parser: argparse.ArgumentParser) -> None:
    """``--priority N`` on a command that sends nodes to workers."""
    low, high = PRIORITY_RANGE
    parser.add_argument("--priority", type=priority, default=0, metavar="N",
                        help=f"this run's nodes on a worker's queue, {low}..{high} (default 0): higher is "
                        "served first; clients of one priority take turns")


def client_options(args: argparse.Namespace) -> ClientOptions:
    """The settings and CURVE keys ``args`` ask for (keys from the environment where no flag names them)."""
    from diffsplit.transport.auth import client_curve
    from diffsplit.transport.protocol import DEFAULT_SETTINGS, settings_for_timeout

    timeout = getattr(args, "heartbeat_timeout", None)
    settings = DEFAULT_SETTINGS if timeout is None else settings_for_timeout(timeout)
    curve = client_curve(getattr(args, "curve", None), getattr(args, "server_key", None))
    return ClientOptions(settings, curve)


def add_loading_argument(parser: argparse.ArgumentParser) -> None:
    """``--eager-loaders`` on a command that sends nodes to workers."""
    parser.add_argument("--eager-loaders", action="store_true",
                        help="load every model here as its loader node runs (default: a model is loaded "
                        "here only when a node here uses it; one only remote nodes use is never loaded)")
