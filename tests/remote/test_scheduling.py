"""Scheduling on a worker: request priorities, cancelling a queued request, places and waits streamed.

The fair queue in isolation (random replays against the drain, and against a
reference built from priority-less queues), then real in-process workers on
loopback with real clients and the tiny seeded models. Nothing is timed: a
long sampler (thousands of steps) holds the single slot until the test has
seen what it waits for, then is cancelled; every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import operator
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
from diffsplit.remote.errors import BadRequest
from diffsplit.remote.fair_queue import FairQueue, QueueOrder
from diffsplit.remote.wait_estimate import RUN_TIME_WINDOW, RunTimes, job_kind, queued_message, wait_s
from diffsplit.remote.worker import Worker
from diffsplit.transport.envelope import decode, encode
from diffsplit.transport.protocol import WORKER_SETTINGS, heartbeat
from diffsplit.transport.server import Request, Server
from diffsplit.transport.sockets import Client
from diffsplit.transport.worker_ops import MAX_PRIORITY, MIN_PRIORITY
from diffsplit.transport.worker_ops import parse_priority as request_priority

from .test_space_sharing import LONG_STEPS, WAIT_S, Watched, fp16_config, is_step, sampler, serving

PRIORITIES = (-3, 0, 0, 2, 5)  # 0 twice: most items share the default level
Item = TypeVar("Item")

# -- the fair queue with priorities, in isolation ---------------------------------------------------


def random_ops(rng: random.Random, count: int) -> list[tuple[str, str, int]]:
    """("put", client, priority) or ("get", "", 0), three puts to a get."""
    return [("put", rng.choice("abcd"), rng.choice(PRIORITIES)) if rng.random() < 0.75 else ("get", "", 0)
            for _ in range(count)]


def drain(queue: FairQueue[Item]) -> list[Item]:
    items = []
    while (item := queue.get(timeout=0)) is not None:
        items.append(item)
    return items


@pytest.mark.parametrize("seed", range(6))
def test_ahead_is_the_index_in_the_drain_with_priorities(seed: int) -> None:
    """Replaying every prefix of random puts and gets: ``ahead`` is where the drain hands the item out,
    ``order()`` is the drain, and the drain never goes up in priority."""
    rng = random.Random(seed)
    ops = random_ops(rng, 60)
    priority_of = {index: priority for index, (op, _, priority) in enumerate(ops) if op == "put"}
    for end in range(1, len(ops) + 1):
        if ops[end - 1][0] != "put":
            continue
        queue: FairQueue[int] = FairQueue()
        place = None
        for index, (op, client, priority) in enumerate(ops[:end]):
            if op == "put":
                place = queue.put(client, index, priority)
            else:
                queue.get(timeout=0)
        order = queue.order()
        drained = drain(queue)
        assert place is not None and drained.index(end - 1) == place.ahead, (ops[:end], drained, place)
        assert list(order.items) == drained
        levels = [priority_of[item] for item in drained]
        assert levels == sorted(levels, reverse=True), drained


class ReferenceQueue:
    """The specification: one priority-less FairQueue per level (today's round robin), highest first."""

    def __init__(self) -> None:
        self.levels: dict[int, FairQueue[int]] = {}

    def put(self, client: str, item: int, priority: int) -> None:
        self.levels.setdefault(priority, FairQueue()).put(client, item)

    def get(self) -> int | None:
        for priority in sorted(self.levels, reverse=True):
            if len(self.levels[priority]):
                return self.levels[priority].get(timeout=0)
        return None


@pytest.mark.parametrize("seed", range(6))
def test_within_a_priority_the_round_robin_is_todays(seed: int) -> None:
    rng = random.Random(100 + seed)
    queue: FairQueue[int] = FairQueue()
    reference = ReferenceQueue()
    for index, (op, client, priority) in enumerate(random_ops(rng, 200)):
        if op == "put":
            queue.put(client, index, priority)
            reference.put(client, index, priority)
        else:
            assert queue.get(timeout=0) == reference.get()
    rest = drain(queue)
    assert rest == [reference.get() for _ in rest] and reference.get() is None


def test_one_client_with_a_thousand_waiting_does_not_starve_one_with_one() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(1000):
        queue.put("busy", f"busy{n}")
    assert queue.put("polite", "polite0").ahead == 1  # right after the busy client's first
    urgent = queue.put("late", "urgent0", priority=1)
    assert urgent.ahead == 0  # a higher priority goes first, whatever came before
    assert queue.put("late", "late0").ahead == 3  # behind urgent0, then the first round: busy0, polite0
    drained = [queue.get(timeout=0) for _ in range(5)]
    assert drained == ["urgent0", "busy0", "polite0", "late0", "busy1"]
    assert len(queue) == 998


def test_no_priority_is_priority_zero() -> None:
    plain: FairQueue[str] = FairQueue()
    explicit: FairQueue[str] = FairQueue()
    for client, item in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        assert plain.put(client, item) == explicit.put(client, item, 0)
    explicit.put("d", "low", priority=-1)
    assert drain(plain) == ["a1", "b1", "c1", "a2", "b2"]
    assert drain(explicit) == ["a1", "b1", "c1", "a2", "b2", "low"]


@pytest.mark.parametrize("seed", range(6))
def test_remove_takes_items_out_and_never_pushes_the_others_back(seed: int) -> None:
    """Random puts, gets and removals: what stays keeps its place or moves up (never back), those
    ahead of a removed item keep theirs, and ``ahead`` and ``order()`` still match the drain."""
    rng = random.Random(200 + seed)
    queue: FairQueue[int] = FairQueue()
    for index in range(150):
        roll = rng.random()
        if roll < 0.6:
            place = queue.put(rng.choice("abc"), index, rng.choice(PRIORITIES))
            assert queue.order().items.index(index) == place.ahead
        elif roll < 0.75:
            queue.get(timeout=0)
        else:
            before = queue.order().items
            if not before:
                continue
            target = rng.choice(before)
            assert queue.remove(partial(operator.eq, target)) == [target]
            after = queue.order().items
            assert target not in after and len(after) == len(before) - 1 == len(queue)
            cut = before.index(target)
            assert after[:cut] == before[:cut]
            assert all(after.index(item) <= before.index(item) for item in after)
    order = queue.order().items
    assert list(order) == drain(queue)


def test_remove_several_and_nothing() -> None:
    queue: FairQueue[str] = FairQueue()
    for client, item, priority in [("a", "a1", 0), ("a", "a2", 0), ("b", "b1", 0), ("b", "b2", 3),
                                   ("c", "c1", 0)]:
        queue.put(client, item, priority)
    assert queue.remove(lambda item: item == "zzz") == []
    assert queue.remove(lambda item: item.startswith("b")) == ["b2", "b1"]  # in the order they stood
    assert queue.order().items == ("a1", "c1", "a2")
    assert queue.remove(lambda item: item == "a1") == ["a1"]
    assert queue.order().items == ("a2", "c1")  # a keeps its turn: its next item moves up
    assert queue.put("b", "b3").ahead == 2  # b left the turn with its last item: it joins at the back
    queue.close()
    assert queue.remove(lambda item: True) == []


def test_order_counts_what_is_taken() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.put("a", "a1")
    queue.put("a", "a2")
    assert queue.get(timeout=0) == "a1"
    assert queue.order() == QueueOrder(items=("a2",), taken=1)
    queue.done()
    assert queue.order().taken == 0


@pytest.mark.parametrize("value", [MIN_PRIORITY, -1, 0, 3, MAX_PRIORITY])
def test_a_priority_in_range_is_taken(value: int) -> None:
    assert request_priority({"priority": value}) == value


@pytest.mark.parametrize("value", [MIN_PRIORITY - 1, MAX_PRIORITY + 1, 10**30, True, 2.0, "high", None, [1]])
def test_a_priority_out_of_range_or_not_an_int_is_refused(value: object) -> None:
    with pytest.raises(BadRequest, match=r"'priority' must be an int in \[-10, 10\]"):
        request_priority({"priority": value})


def test_no_priority_in_the_header_is_zero() -> None:
    assert request_priority({}) == 0


# -- the wait estimate, in isolation ----------------------------------------------------------------


def test_run_times_keep_a_rolling_window_per_kind() -> None:
    times = RunTimes()
    assert times.mean("run_node KSampler") is None
    for seconds in range(RUN_TIME_WINDOW + 4):  # the first four fall out of the window
        times.record("run_node KSampler", float(seconds))
    window = range(4, RUN_TIME_WINDOW + 4)
    assert times.mean("run_node KSampler") == sum(window) / RUN_TIME_WINDOW
    assert times.mean("run_node VAEDecode") is None
    small = RunTimes(window=2, max_kinds=2)
    small.record("a", 1.0)
    small.record("b", 2.0)
    small.record("a", 3.0)  # a was run last: b is forgotten first
    small.record("c", 4.0)
    assert (small.mean("a"), small.mean("b"), small.mean("c")) == (2.0, None, 4.0)


@pytest.mark.parametrize(("ahead", "busy", "slots", "rounds"), [
    (0, 1, 1, 1),  # the running job must end first
    (2, 1, 1, 3),
    (0, 2, 2, 1),
    (1, 2, 2, 1),  # two slot turns end in one round of two slots
    (2, 2, 2, 2),
    (1, 1, 2, 1),  # a free slot takes the one ahead, this one waits for the running job
])
def test_the_wait_is_the_mean_times_the_rounds_of_slot_turns(ahead: int, busy: int, slots: int,
                                                              rounds: int) -> None:
    assert wait_s(1.5, ahead=ahead, busy=busy, slots=slots) == 1.5 * rounds
    assert wait_s(None, ahead=ahead, busy=busy, slots=slots) is None


def test_the_message_keeps_its_keys_and_adds_eta_s_when_known() -> None:
    assert queued_message(ahead=2, busy=1, slots=1, eta_s=None, node="6") == {
        "queued": 3, "waiting": "queued: 2 request(s) ahead, all 1 slot(s) busy", "node": "6"}
    assert queued_message(ahead=2, busy=1, slots=2, eta_s=3.2, node=None) == {
        "queued": 3, "waiting": "queued: 2 request(s) ahead, 1 of 2 slot(s) busy, about 3 s", "eta_s": 3.2}
    assert queued_message(ahead=0, busy=1, slots=1, eta_s=0.2, node=None)["waiting"].endswith("about 1 s")


def test_job_kinds() -> None:
    assert job_kind("run_node", {"node": {"id": "6", "class_type": "KSampler"}}) == "run_node KSampler"
    assert job_kind("run_node", {"node": "junk"}) == "run_node"
    assert job_kind("call", {"method": "forward"}) == "call forward"
    assert job_kind("upload", {}) == "upload"
    assert len(job_kind("run_node", {"node": {"class_type": "x" * 10_000}})) < 100


# -- the server's cancel hook ------------------------------------------------------------------------


def test_the_server_tells_its_owner_of_a_cancel_and_goes_on_when_the_owner_fails() -> None:
    heard: list[Request] = []

    def on_cancel(request: Request) -> None:
        heard.append(request)
        raise RuntimeError("the owner's bug")

    with Server(on_cancel=on_cancel) as server, Client(server.endpoint) as client:
        request_id = client.submit({"op": "work"})
        request = server.recv(timeout=WAIT_S)
        assert request is not None and request.request_id == request_id
        client.cancel(request_id)
        assert request.cancelled.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not heard:
            assert time.monotonic() < deadline, "on_cancel was never called"
            time.sleep(0.01)
        assert heard == [request]
        second = client.submit({"op": "more"})  # the I/O thread survived the failing callback
        request = server.recv(timeout=WAIT_S)
        assert request is not None and request.request_id == second
        server.reply(request, {"op": "result"})
        assert client.result(second, timeout=WAIT_S)["op"] == "result"


# -- real workers -----------------------------------------------------------------------------------


class Peer:
    """A raw DEALER that reads what a worker sends even after it cancels (a Client drops late replies)."""

    def __init__(self, endpoint: str, *, beats: bool = True) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.beats = beats

    def send(self, header: dict[str, Any]) -> None:
        self.sock.send_multipart(encode(header))

    def next(self) -> dict[str, Any]:
        """The next message that is not a heartbeat (beating meanwhile unless told to stay silent)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.beats:
                self.sock.send_multipart(heartbeat())
            if self.sock.poll(500):
                message = decode(self.sock.recv_multipart())
                if message["op"] != "heartbeat":
                    return message
        raise AssertionError("the worker sent nothing")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@contextmanager
def peer_of(worker: Worker, *, beats: bool = True) -> Iterator[Peer]:
    peer = Peer(worker.endpoint, beats=beats)
    try:
        yield peer
    finally:
        peer.close()


def status_of(address: str) -> dict[str, Any]:
    with Client(address) as client:
        reply = client.request({"op": "status"}, timeout=30)
    assert reply["op"] == "result", reply
    return reply["status"]


def wait_status(address: str, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status = status_of(address)
        if check(status):
            return status
        assert time.monotonic() < deadline, f"never {what}: {status}"
        time.sleep(0.05)


def places(job: Watched) -> list[int]:
    """The places a request was told, in order."""
    return [m["queued"] for m in job.messages if "queued" in m]


def told(place: int) -> Callable[[dict[str, Any]], bool]:
    return lambda message: message.get("queued") == place


def with_priority(header: dict[str, Any], priority: object) -> dict[str, Any]:
    return {**header, "priority": priority}


def test_a_higher_priority_request_queued_later_runs_first(models_dir: Path) -> None:
    with serving(fp16_config(models_dir, slots=1)) as worker, Client(worker.endpoint) as first, \
            Client(worker.endpoint) as second, Client(worker.endpoint) as third:
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        normal = Watched(second, sampler(models_dir, node_id="n"))
        normal.wait_for(told(1), "the normal request's place")
        urgent = Watched(third, with_priority(sampler(models_dir, steps=LONG_STEPS, seed=2, node_id="u"), 5))
        urgent_place = urgent.wait_for(told(1), "the urgent request's place")
        normal.wait_for(told(2), "the normal request told it moved back")
        holder.cancel()
        urgent.wait_for(is_step, "step from the urgent sampler")  # it took the slot ...
        status = status_of(worker.endpoint)  # ... while the normal one still waits: it never ran
        normal.wait_for(lambda m: places(normal) == [1, 2, 1], "the normal request told it moved up")
        assert normal.reply is None and not any(is_step(m) for m in normal.messages)
        urgent.cancel()
        reply = normal.finish()
    assert status["queue"]["length"] == 1 and status["slots"]["busy"] == 1
    assert urgent_place == {**urgent_place, "node": "u",
                            "waiting": "queued: 0 request(s) ahead, all 1 slot(s) busy"}
    assert "eta_s" not in urgent_place  # no KSampler has finished on this worker yet
    assert reply["op"] == "result", reply
    assert places(urgent) == [1]
    first_step = next(n for n, m in enumerate(normal.messages) if is_step(m))
    assert places(normal) == [1, 2, 1]  # one message per change of place, all before it ran
    assert all("queued" not in m for m in normal.messages[first_step:])


def test_cancelling_a_queued_request_answers_it_at_once_and_frees_its_place(models_dir: Path) -> None:
    """One slot, room for two waiting, one request per client: the third waiting request is refused
    until a cancel takes one out; the cancelled one hears Cancelled while the holder still runs."""
    config = fp16_config(models_dir, slots=1, max_queue=2, max_queue_per_client=0)
    with serving(config) as worker, Client(worker.endpoint) as first, Client(worker.endpoint) as second, \
            Client(worker.endpoint) as third, peer_of(worker) as peer:
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        peer.send({**sampler(models_dir, node_id="p"), "request_id": "p1"})
        peer_place = peer.next()
        waiter = Watched(second, sampler(models_dir, node_id="w"))
        waiter.wait_for(told(2), "the waiting request's place")
        full = third.request(sampler(models_dir), timeout=WAIT_S)
        before = status_of(worker.endpoint)

        peer.send({"op": "cancel", "request_id": "p1"})
        cancelled = peer.next()
        assert holder.reply is None  # answered now, not when a slot would have taken it
        waiter.wait_for(told(1), "the waiting request told it moved up")
        after = status_of(worker.endpoint)

        peer.send({**sampler(models_dir, node_id="p"), "request_id": "p2"})  # its share and place are free
        again = peer.next()
        peer.send({"op": "cancel", "request_id": "p2"})
        cancelled_again = peer.next()
        holder.cancel()
        reply = waiter.finish()
    assert peer_place == {**peer_place, "op": "progress", "request_id": "p1", "queued": 1, "node": "p"}
    assert full["op"] == "error" and full["error"]["kind"] == "Overloaded", full
    assert "the queue is full" in full["error"]["message"]
    assert before["queue"]["length"] == 2 and before["slots"]["busy"] == 1
    assert cancelled["op"] == "error" and cancelled["request_id"] == "p1", cancelled
    assert cancelled["error"]["kind"] == "Cancelled"
    assert cancelled["error"]["message"] == "request p1 was cancelled while queued"
    assert after["queue"]["length"] == 1 and after["slots"]["busy"] == 1
    assert again == {**again, "op": "progress", "request_id": "p2", "queued": 2}
    assert cancelled_again["op"] == "error" and cancelled_again["error"]["kind"] == "Cancelled"
    assert reply["op"] == "result", reply
    assert places(waiter) == [2, 1]  # p2 queued behind it: its place did not change, nothing said


def test_a_queued_request_of_a_silent_client_is_dropped(models_dir: Path) -> None:
    settings = dataclasses.replace(WORKER_SETTINGS, heartbeat_timeout=3.0)
    with serving(fp16_config(models_dir, slots=1, settings=settings)) as worker, \
            Client(worker.endpoint) as first, peer_of(worker, beats=False) as mute:
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        mute.send({**sampler(models_dir, node_id="m"), "request_id": "m1"})
        assert mute.next()["queued"] == 1
        wait_status(worker.endpoint, lambda s: s["queue"]["length"] == 0, "dropped the silent request")
        dropped = mute.next()
        assert holder.reply is None
        holder.cancel()
    assert dropped["op"] == "error" and dropped["request_id"] == "m1" and \
        dropped["error"]["kind"] == "Cancelled", dropped


def test_a_wait_is_estimated_from_the_jobs_of_its_kind_that_ran_here(models_dir: Path) -> None:
    with serving(fp16_config(models_dir, slots=1)) as worker, Client(worker.endpoint) as first, \
            Client(worker.endpoint) as second:
        warm = first.request(sampler(models_dir), timeout=WAIT_S)
        assert warm["op"] == "result", warm
        holder = Watched(first, sampler(models_dir, steps=LONG_STEPS, seed=1))
        holder.wait_for(is_step, "step from the long sampler")
        waiter = Watched(second, sampler(models_dir, node_id="w"))
        message = waiter.wait_for(told(1), "the waiting request's place")
        holder.cancel()  # a cancelled job is not counted in the estimate
        assert waiter.finish()["op"] == "result"
    timings = warm["timings"]
    assert isinstance(message["eta_s"], float)
    assert message["eta_s"] >= timings["rebuild_s"] + timings["run_s"]  # its slot time covered both
    assert message["waiting"] == ("queued: 0 request(s) ahead, all 1 slot(s) busy, "
                                  f"about {max(1, round(message['eta_s']))} s")
    assert places(waiter) == [1]


def test_a_bad_priority_is_refused(models_dir: Path) -> None:
    bad: list[object] = [MAX_PRIORITY + 1, MIN_PRIORITY - 1, "high", True, None]
    with serving(fp16_config(models_dir, slots=1)) as worker, Client(worker.endpoint) as client:
        replies = [client.request(with_priority(sampler(models_dir), priority), timeout=WAIT_S)
                   for priority in bad]
        accepted = client.request(with_priority(sampler(models_dir), MIN_PRIORITY), timeout=WAIT_S)
        status = status_of(worker.endpoint)
    for priority, reply in zip(bad, replies, strict=True):
        assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest", (priority, reply)
        assert reply["error"]["message"] == f"'priority' must be an int in [-10, 10], not {priority!r}"
    assert accepted["op"] == "result", accepted
    assert status["queue"]["length"] == 0 and status["requests"]["errors"] == len(bad)
