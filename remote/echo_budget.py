"""How many bytes of echo replies (link probes) a worker sends per second, across all clients.

An echo costs a peer a few bytes and the worker up to ``MAX_ECHO_BYTES``; a
peer that stops reading leaves every reply queued in the worker's memory. A
token bucket over all clients bounds what echo can queue per second; a probe
over it is answered ``Overloaded`` (a link probe sends a few MiB in all).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: The largest reply one echo may ask for: a link probe's largest, and it fits the 4 MiB header limit.
MAX_ECHO_BYTES = 3 << 20
#: Bytes of echo replies per second, and the burst a full bucket allows.
ECHO_BYTES_PER_S = 8 << 20
ECHO_BURST_BYTES = 32 << 20


class EchoBudget:
    """A thread-safe token bucket of reply bytes."""

    def __init__(
        self, rate: float = ECHO_BYTES_PER_S, burst: float = ECHO_BURST_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Spend ``size`` bytes if the bucket holds them; False (nothing spent) otherwise."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if size > self._tokens:
                return False
            self._tokens -= size
            return True
