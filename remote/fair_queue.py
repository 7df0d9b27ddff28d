"""Time-sharing between clients: one FIFO per client, served round robin, by priority.

A client that queues ten requests does not make another client's single
request wait behind all ten: the slots take the next request of each client
in turn. Items carry a priority (default 0): a higher one is served first, and
within one priority the round robin is as above, so fairness holds among
requests of the same priority. :class:`ClientShares` caps how many requests
one client has in flight, so one client cannot fill a bounded queue and lock
the others out. :meth:`FairQueue.put` says where the item stands
(:class:`QueuePlace`) and :meth:`FairQueue.order` where every waiting item
stands now, so a worker can tell a client its place in line and why it waits;
:meth:`FairQueue.remove` drops waiting items (a cancelled request).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")



class QueueClosed(Exception):
    """The queue was closed and has nothing left to hand out."""


@dataclass(frozen=True)
class QueuePlace:
    """Where an item stood when it was queued (both counted at that instant, under the queue's lock)."""

    #: items the queue will hand out before this one (higher priorities first, then its level's round robin)
    ahead: int
    #: items handed out by :meth:`FairQueue.get` and not yet marked :meth:`FairQueue.done` (busy takers)
    taken: int


@dataclass(frozen=True)
class QueueOrder(Generic[Item]):
    """Every waiting item in the order the queue would hand them out if nothing more came (a snapshot)."""

    #: the waiting items, next first: an item's index is its ``ahead``
    items: tuple[Item, ...]
    #: as in :class:`QueuePlace`
    taken: int


class FairQueue(Generic[Item]):
    """Per-client FIFOs served round robin within each priority, higher priorities first; thread-safe."""

    def __init__(self) -> None:
        #: priority -> client -> its FIFO, clients in their turn's order (an empty level is deleted)
        self._levels: dict[int, OrderedDict[Hashable, deque[Item]]] = {}
        self._ready = threading.Condition()
        self._closed = False
        self._taken = 0

    def put(self, client: Hashable, item: Item, priority: int = 0) -> QueuePlace:
        """Queue ``item`` behind the same client's earlier items of ``priority``; where it stands now.

        ``ahead`` counts every item of a higher priority, then follows the round robin of its own
        priority as it is now: the client's own earlier items, up to as many of each other client's,
        and one more of each client served before it in the turn it is in. A client with fewer items,
        or a higher priority, that queues later can still go ahead of it (that is the fairness), so
        the place is an estimate that only a newcomer makes worse.
        """
        with self._ready:
            if self._closed:
                raise QueueClosed("the queue is closed")
            ahead = sum(len(items) for level, queues in self._levels.items() if level > priority
                        for items in queues.values())
            queues = self._levels.setdefault(priority, OrderedDict())
            own = queues.setdefault(client, deque())
            turn = len(own)  # this item is taken in round ``turn`` of its level (0: the first round)
            ahead += turn
            before = True
            for other, items in queues.items():
                if other == client:
                    before = False
                    continue
                ahead += min(len(items), turn) + (1 if before and len(items) > turn else 0)
            own.append(item)
            self._ready.notify()
            return QueuePlace(ahead=ahead, taken=self._taken)

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item: the highest priority first, its clients in turn; None after ``timeout``;
        QueueClosed once drained."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._levels or self._closed, timeout):
                return None
            if not self._levels:
                raise QueueClosed("the queue is closed")
            priority = max(self._levels)
            queues = self._levels[priority]
            client, items = next(iter(queues.items()))
            item = items.popleft()
            del queues[client]
            if items:  # the client goes to the back of the line
                queues[client] = items
            elif not queues:
                del self._levels[priority]
            self._taken += 1
            return item

    def order(self) -> QueueOrder[Item]:
        """Where every waiting item stands now: the order :meth:`get` would hand them out."""
        with self._ready:
            return QueueOrder(tuple(self._drain_order()), self._taken)

    def _drain_order(self) -> list[Item]:
        order: list[Item] = []
        for priority in sorted(self._levels, reverse=True):
            active = [list(items) for items in self._levels[priority].values()]
            turn = 0
            while active:  # round ``turn``: each client with an item left gives one, in turn order
                order.extend(items[turn] for items in active)
                turn += 1
                active = [items for items in active if len(items) > turn]
        return order

    def remove(self, predicate: Callable[[Item], bool]) -> list[Item]:
        """Take the waiting items ``predicate`` accepts out of the queue (in the order they stood).

        ``predicate`` sees each waiting item once, under the queue's lock (keep it quick). The others
        keep their order; a client left with no items leaves its turn.
        """
        with self._ready:
            removed = [item for item in self._drain_order() if predicate(item)]
            if not removed:
                return []
            gone = {id(item) for item in removed}
            for priority in list(self._levels):
                queues = self._levels[priority]
                for client in list(queues):
                    kept = deque(item for item in queues[client] if id(item) not in gone)
                    if kept:
                        queues[client] = kept  # an existing key keeps its place in the turn
                    else:
                        del queues[client]
                if not queues:
                    del self._levels[priority]
            return removed

    def done(self) -> None:
        """An item :meth:`get` handed out is finished with (its taker is free again)."""
        with self._ready:
            self._taken = max(0, self._taken - 1)

    def close(self) -> list[Item]:
        """Refuse new items and return the ones still waiting, next first (for the caller to answer)."""
        with self._ready:
            self._closed = True
            left = self._drain_order()
            self._levels.clear()
            self._ready.notify_all()
            return left

    def __len__(self) -> int:
        with self._ready:
            return sum(len(items) for queues in self._levels.values() for items in queues.values())


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
