"""Client and Server over real loopback sockets: replies, pipelining, heartbeats, dead peers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import zmq
from diffsplit.transport.envelope import Limits, decode, encode
from diffsplit.transport.errors import PeerGone, Rejected, RequestTimeout, TransportError
from diffsplit.transport.sockets import Client, Request, Server, Settings

FAST = Settings(heartbeat_interval=0.05, heartbeat_timeout=1.0)  # roomy on a loaded machine
WAIT = 10.0  # generous upper bound on every wait; never a timing assertion


class Handler:
    """Runs a Server's receive loop in a thread, passing each request to ``handle``."""

    def __init__(self, server: Server, handle: Callable[[Server, Request], None]) -> None:
        self.server = server
        self.handle = handle
        self.seen: list[Request] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                request = self.server.recv(timeout=0.1)
            except TransportError:
                return
            if request is not None:
                self.seen.append(request)
                self.handle(self.server, request)


def worker(server: Server, request: Request) -> None:
    header = request.header
    if header["op"] == "sleep":
        time.sleep(header["seconds"])
    if header["op"] == "hang":
        return
    for step in range(header.get("steps", 0)):
        server.progress(request, {"step": step})
    server.reply(request, {"op": "result", "echo": header.get("payload")})


@pytest.fixture
def server() -> Iterator[Server]:
    with Server("tcp://127.0.0.1:*", settings=FAST) as srv:
        handler = Handler(srv, worker)
        yield srv
    handler.thread.join(WAIT)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.endpoint, settings=FAST) as c:
        yield c


def test_tensors_and_nested_data_round_trip(client: Client) -> None:
    latent = {"samples": torch.randn(1, 4, 64, 64), "noise_mask": torch.rand(1, 1, 64, 64)}
    cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280), "width": 1024}]]
    reply = client.request(
        {"op": "echo", "payload": {"latent": latent, "cond": cond, "t": (1, "a")}}, timeout=WAIT
    )
    echo = reply["echo"]
    assert reply["op"] == "result" and isinstance(reply["request_id"], str)
    assert torch.equal(echo["latent"]["samples"], latent["samples"])
    assert torch.equal(echo["latent"]["noise_mask"], latent["noise_mask"])
    assert torch.equal(echo["cond"][0][0], cond[0][0]) and echo["cond"][0][1]["width"] == 1024
    assert torch.equal(echo["cond"][0][1]["pooled_output"], cond[0][1]["pooled_output"])
    assert echo["t"] == (1, "a")
    echo["latent"]["samples"].mul_(2)  # received tensors are writable


def test_16_mb_round_trip(client: Client) -> None:
    t = torch.randn(4, 1024, 1024)
    out = client.request({"op": "echo", "payload": t}, timeout=WAIT)["echo"]
    assert out.dtype == t.dtype and torch.equal(out, t)


def test_pipelined_requests_are_matched_by_id() -> None:
    batch: list[Request] = []

    def reply_in_reverse(server: Server, request: Request) -> None:
        batch.append(request)
        if len(batch) == 5:
            for r in reversed(batch):
                server.reply(r, {"op": "result", "echo": r.header["payload"]})

    with Server(settings=FAST) as srv, Client(srv.endpoint, settings=FAST) as c:
        handler = Handler(srv, reply_in_reverse)
        ids = [c.submit({"op": "echo", "payload": torch.full((1000,), float(i))}) for i in range(5)]
        assert len(set(ids)) == 5
        for i, request_id in enumerate(ids):
            assert torch.equal(c.result(request_id, timeout=WAIT)["echo"], torch.full((1000,), float(i)))
    handler.thread.join(WAIT)


def test_caller_chosen_request_ids(client: Client) -> None:
    assert client.submit({"op": "echo", "request_id": "job-1", "payload": 1}) == "job-1"
    with pytest.raises(ValueError, match="already outstanding"):
        client.submit({"op": "echo", "request_id": "job-1"})
    assert client.result("job-1", timeout=WAIT)["echo"] == 1
    with pytest.raises(KeyError):
        client.result("job-1", timeout=WAIT)


def test_progress_messages_arrive_in_order(client: Client) -> None:
    steps: list[int] = []
    reply = client.request(
        {"op": "echo", "steps": 5, "payload": "done"}, WAIT, on_progress=lambda h: steps.append(h["step"])
    )
    assert steps == [0, 1, 2, 3, 4] and reply["echo"] == "done"


def test_heartbeats_keep_a_long_request_alive(client: Client) -> None:
    seconds = FAST.heartbeat_timeout * 2  # the handler sends nothing meanwhile; the I/O thread does
    assert (
        client.request({"op": "sleep", "seconds": seconds, "payload": "late"}, timeout=WAIT)["echo"] == "late"
    )


def test_threads_share_one_client(client: Client) -> None:
    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = client.request({"op": "echo", "payload": i}, timeout=WAIT)["echo"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == {i: i for i in range(8)}


SERVER_SCRIPT = textwrap.dedent(
    """
    import time
    from diffsplit.transport.sockets import Server, Settings

    server = Server(settings=Settings(heartbeat_interval=0.05, heartbeat_timeout=1.0))
    print(server.endpoint, flush=True)
    request = server.recv(timeout=30)
    server.progress(request, {"stage": "working"})
    time.sleep(60)  # alive and heartbeating until killed
    """
)


def test_killed_server_process_raises_peer_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:")
        with Client(endpoint, settings=FAST) as c:
            request_id = c.submit({"op": "work"})
            with pytest.raises(PeerGone, match=r"heartbeat_timeout=1\.0"):
                c.result(request_id, timeout=WAIT, on_progress=lambda header: proc.kill())
    finally:
        proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()
    assert proc.returncode != 0


def test_no_server_at_all_raises_peer_gone() -> None:
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    ctx.term()
    with Client(f"tcp://127.0.0.1:{port}", settings=FAST) as c, pytest.raises(PeerGone):
        c.request({"op": "echo"}, timeout=WAIT)


@pytest.fixture
def hang_server() -> Iterator[tuple[Server, list[Request]]]:
    received: list[Request] = []
    with Server(settings=FAST) as srv:
        handler = Handler(srv, lambda server, request: received.append(request))
        yield srv, received
    handler.thread.join(WAIT)


def wait_for(items: list, n: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while len(items) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(items) >= n


def test_deadline_raises_request_timeout_and_cancels(hang_server) -> None:
    srv, received = hang_server
    with Client(srv.endpoint, settings=FAST) as c:
        with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
            c.request({"op": "hang"}, timeout=0.3)
        wait_for(received)
        assert received[0].cancelled.wait(WAIT)


def test_explicit_cancel_reaches_the_server(hang_server) -> None:
    srv, received = hang_server
    with Client(srv.endpoint, settings=FAST) as c:
        request_id = c.submit({"op": "hang"})
        wait_for(received)
        c.cancel(request_id)
        assert received[0].cancelled.wait(WAIT)
        with pytest.raises(KeyError):
            c.result(request_id, timeout=WAIT)


def test_a_silent_client_gets_its_requests_cancelled(hang_server) -> None:
    srv, received = hang_server
    c = Client(srv.endpoint, settings=FAST)
    c.submit({"op": "hang"})
    wait_for(received)
    assert not received[0].cancelled.is_set()
    c.close()  # no cancel is sent: the server notices the silence
    assert received[0].cancelled.wait(WAIT)
    srv.reply(received[0], {"op": "result"})  # a late reply to a gone client is harmless


def test_server_rejects_what_it_cannot_read() -> None:
    with Server(
        settings=Settings(limits=Limits(max_frames=1), heartbeat_interval=0.05, heartbeat_timeout=1.0)
    ) as srv:
        with Client(srv.endpoint, settings=FAST) as c, pytest.raises(Rejected, match="max_frames=1"):
            c.request({"op": "echo", "a": torch.zeros(20000), "b": torch.ones(20000)}, timeout=WAIT)
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(srv.endpoint)
        raw.send_multipart([b"not", b"a", b"diffsplit message"])
        assert raw.poll(WAIT * 1000)
        reply = decode(raw.recv_multipart(copy=False))
        assert reply["op"] == "error" and reply["request_id"] is None and "magic" in reply["error"]["message"]
        raw.send_multipart(encode({"op": 42}))
        assert raw.poll(WAIT * 1000)
        assert decode(raw.recv_multipart())["error"]["kind"] == "BadRequest"
        raw.close(0)
        ctx.term()
        assert srv.recv(timeout=0.05) is None


def test_misuse_and_lifecycle(server: Server) -> None:
    c = Client(server.endpoint, settings=FAST)
    with pytest.raises(ValueError, match="op"):
        c.submit({"payload": 1})
    with pytest.raises(ValueError, match="op"):
        c.submit({"op": "heartbeat"})
    request_id = c.submit({"op": "hang"})
    c.close()
    c.close()
    with pytest.raises(TransportError, match="closed"):
        c.result(request_id, timeout=WAIT)
    with pytest.raises(TransportError, match="closed"):
        c.submit({"op": "echo"})
    with pytest.raises(TransportError, match="cannot bind"):
        Server(server.endpoint, settings=FAST)
    with pytest.raises(TransportError, match="cannot connect"):
        Client("nonsense://here", settings=FAST)
    with pytest.raises(ValueError, match="heartbeat"):
        Settings(heartbeat_interval=2.0, heartbeat_timeout=1.0)


def test_closed_server_stops_recv() -> None:
    srv = Server(settings=FAST)
    assert srv.recv(timeout=0.01) is None
    srv.close()
    with pytest.raises(TransportError, match="closed"):
        srv.recv(timeout=0.01)


def test_a_cancel_event_set_while_waiting_cancels_on_the_server(hang_server) -> None:
    from diffsplit.transport.errors import RequestCancelled

    srv, received = hang_server
    cancel = threading.Event()
    with Client(srv.endpoint, settings=FAST) as c:
        request_id = c.submit({"op": "hang"})
        wait_for(received)
        threading.Timer(0.2, cancel.set).start()
        with pytest.raises(RequestCancelled):
            c.result(request_id, timeout=WAIT, cancel=cancel)
        assert received[0].cancelled.wait(WAIT)


def test_an_exchange_reports_the_sizes_of_both_messages_as_they_crossed(client: Client) -> None:
    from diffsplit.transport.envelope import describe

    payload = {"latent": torch.randn(1, 4, 32, 32), "text": "x" * 100}
    exchange = client.exchange({"op": "echo", "payload": payload, "request_id": "fixed-id"}, timeout=WAIT)
    assert torch.equal(exchange.reply["echo"]["latent"], payload["latent"])
    sent = describe({"op": "echo", "payload": payload, "request_id": "fixed-id"})
    assert exchange.sent == sent and exchange.sent.tensor_bytes == 4 * 4 * 32 * 32
    reply = {"op": "result", "echo": payload, "request_id": "fixed-id"}
    assert exchange.received.tensor_bytes == describe(reply).tensor_bytes
    assert abs(exchange.received.wire_bytes - describe(reply).wire_bytes) < 64  # + the server's own fields
