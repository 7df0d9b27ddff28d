"""The CPU thread count a computation runs with, which its float results depend on.

CPU kernels split reductions (convolutions, matrix products, norms) by thread,
so the same step run with 1 and with 2 intra-op threads differs in the last
bits. A client therefore states its thread count in every compute request
(``threads`` in the header) and a CPU worker runs that job with the same count:
split stays equal to local on machines with different core counts. The count
is set for the running thread only (OpenMP keeps it per thread), so two worker
slots may run with different counts at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

#: The most threads a request may ask for.
MAX_THREADS = 256
HEADER_KEY = "threads"


class BadThreadCount(ValueError):
    """A request's thread count is not an int in [1, MAX_THREADS]."""


def client_threads() -> int:
    """This thread's intra-op thread count, as a request states it."""
    return torch.get_num_threads()


def requested_threads(header: Mapping[str, Any]) -> int | None:
    """The thread count a request asks for, None when it states none; BadThreadCount when malformed."""
    count = header.get(HEADER_KEY)
    if count is None:
        return None
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_THREADS:
        raise BadThreadCount(f"'{HEADER_KEY}' must be an int in [1, {MAX_THREADS}], not {count!r}")
    return count


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads on this thread (None: leave it as it is)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
