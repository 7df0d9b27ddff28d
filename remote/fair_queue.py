"""Time-sharing between clients: one FIFO per client, served round robin.

A client that queues ten requests does not make another client's single
request wait behind all ten: the slots take the next request of each client
in turn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class QueueClosed(Exception):
    """The queue was closed and has nothing left to hand out."""


class FairQueue(Generic[Item]):
    """Per-client FIFOs served round robin; thread-safe."""

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[Item]] = OrderedDict()
        self._ready = threading.Condition()
        self._closed = False

    def put(self, client: Hashable, item: Item) -> None:
        """Queue ``item`` behind the same client's earlier items."""
        with self._ready:
            if self._closed:
                raise QueueClosed("the queue is closed")
            self._queues.setdefault(client, deque()).append(item)
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item, taking clients in turn; None after ``timeout``; QueueClosed once drained."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._queues or self._closed, timeout):
                return None
            if not self._queues:
                raise QueueClosed("the queue is closed")
            client, items = next(iter(self._queues.items()))
            item = items.popleft()
            del self._queues[client]
            if items:  # the client goes to the back of the line
                self._queues[client] = items
            return item

    def close(self) -> list[Item]:
        """Refuse new items and return the ones still waiting (for the caller to answer)."""
        with self._ready:
            self._closed = True
            left = [item for items in self._queues.values() for item in items]
            self._queues.clear()
            self._ready.notify_all()
            return left

    def __len__(self) -> int:
        with self._ready:
            return sum(len(items) for items in self._queues.values())
