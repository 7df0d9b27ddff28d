"""Joining Ray for ``batch --ray`` and ``serve --ray``: ``local`` starts an instance here, else an address."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffsplit.transport.errors import DiffsplitError

#: ``--ray local``: start a Ray instance in this process rather than join a running cluster.
LOCAL = "local"


class RayUnavailable(DiffsplitError):
    """Ray is not installed, cannot be reached, or failed as a whole (not one item or request)."""


@contextmanager
def ray_session(address: str, *, local_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected as ``address`` says (an instance already running in this process is
    used as it is); an instance this call started is shut down after."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray: pip install 'diffsplit[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "log_to_driver": False}
        if address == LOCAL:  # "local" itself: RAY_ADDRESS must not turn it into a cluster
            kwargs.update(address="local", num_cpus=local_cpus)
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def ray_error_line(exc: BaseException) -> str:
    """The line of a Ray error that says what happened (Ray puts it last, after a traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
