"""Time-sharing between clients: one FIFO per client, served round robin.

A client that queues ten requests does not make another client's single
request wait behind all ten: the slots take the next request of each client
in turn. :class:`ClientShares` caps how many requests one client has in
flight, so one client cannot fill a bounded queue and lock the others out.
:meth:`FairQueue.put` says where the item stands (:class:`QueuePlace`), so a
worker can tell a client its place in line and why it waits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


class QueueClosed(Exception):
    """The queue was closed and has nothing left to hand out."""


@dataclass(frozen=True)
class QueuePlace:
    """Where an item stood when it was queued (both counted at that instant, under the queue's lock)."""

    #: items the queue will hand out before this one, in its round-robin order as things stood
    ahead: int
    #: items handed out by :meth:`FairQueue.get` and not yet marked :meth:`FairQueue.done` (busy takers)
    taken: int


class FairQueue(Generic[Item]):
    """Per-client FIFOs served round robin; thread-safe."""

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[Item]] = OrderedDict()
        self._ready = threading.Condition()
        self._closed = False
        self._taken = 0

    def put(self, client: Hashable, item: Item) -> QueuePlace:
        """Queue ``item`` behind the same client's earlier items; where it stands now.

        ``ahead`` follows the round robin as the queue is now: the client's own earlier items, up to
        as many of each other client's, and one more of each client served before it in the turn it
        is in. A client with fewer items that queues later can still go ahead of it (that is the
        fairness), so the place is an estimate that only a newcomer makes worse.
        """
        with self._ready:
            if self._closed:
                raise QueueClosed("the queue is closed")
            own = self._queues.setdefault(client, deque())
            turn = len(own)  # this item is taken in round ``turn`` (0: the first round)
            ahead = turn
            before = True
            for other, items in self._queues.items():
                if other == client:
                    before = False
                    continue
                ahead += min(len(items), turn) + (1 if before and len(items) > turn else 0)
            own.append(item)
            self._ready.notify()
            return QueuePlace(ahead=ahead, taken=self._taken)

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
            self._taken += 1
            return item

    def done(self) -> None:
        """An item :meth:`get` handed out is finished with (its taker is free again)."""
        with self._ready:
            self._taken = max(0, self._taken - 1)

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


class ClientShares:
    """How many requests each client has in flight (waiting or running), at most ``limit`` each.

    Counted from admission to reply, not from the queue's length, so a request
    a slot has just taken still counts and a burst never slips past the cap.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a client's share must be at least 1, not {limit}")
        self.limit = limit
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: Hashable) -> bool:
        """Count one more request of ``client``; False (nothing counted) when it has ``limit`` already."""
        with self._lock:
            held = self._counts.get(client, 0)
            if held >= self.limit:
                return False
            self._counts[client] = held + 1
            return True

    def release(self, client: Hashable) -> None:
        """One request of ``client`` was answered."""
        with self._lock:
            held = self._counts.get(client, 0) - 1
            if held > 0:
                self._counts[client] = held
            else:
                self._counts.pop(client, None)

    def held(self, client: Hashable) -> int:
        """How many requests of ``client`` are in flight."""
        with self._lock:
            return self._counts.get(client, 0)
