"""Request ids make retries safe (a duplicate or late reply never answers another request), and
large messages do not pass for a dead peer (the client allows for their transfer).

The peer is a raw ZeroMQ ROUTER driven by the test, so it can misbehave on purpose:
answer one request twice, or answer only after the client gave up on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
import zmq
from diffsplit.transport.envelope import decode, encode
from diffsplit.transport.errors import PeerGone
from diffsplit.transport.protocol import ANNOUNCE_BYTES, OP_HEARTBEAT, Settings, settings_for_timeout
from diffsplit.transport.server import Server
from diffsplit.transport.sockets import Client

FAST = Settings(heartbeat_interval=0.1, heartbeat_timeout=1.0)
WAIT_MS = 10_000


class RawPeer:
    """A ROUTER on loopback; ``next_request`` skips heartbeats and returns (routing id, header)."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def next_request(self) -> tuple[bytes, dict]:
        while True:
            assert self.sock.poll(WAIT_MS), "no request arrived"
            peer, *frames = self.sock.recv_multipart(copy=False)
            header = decode(frames)
            if header["op"] != OP_HEARTBEAT:
                return peer.bytes, header

    def reply(self, peer: bytes, request_id: str, value: int) -> None:
        self.sock.send_multipart([peer, *encode({"op": "result", "request_id": request_id, "value": value})])

    def close(self) -> None:
        self.sock.close()
        self.context.term()


@pytest.fixture
def peer() -> Iterator[RawPeer]:
    raw = RawPeer()
    yield raw
    raw.close()


def test_a_duplicate_reply_is_dropped(peer: RawPeer) -> None:
    with Client(peer.endpoint, settings=FAST) as client:
        first = client.submit({"op": "work"})
        routing, header = peer.next_request()
        assert header["request_id"] == first
        peer.reply(routing, first, 1)
        peer.reply(routing, first, 2)  # the same id again: a duplicate
        assert client.result(first, timeout=10)["value"] == 1
        second = client.submit({"op": "work"})
        routing, header = peer.next_request()
        assert header["request_id"] == second != first
        peer.reply(routing, second, 3)
        assert client.result(second, timeout=10)["value"] == 3  # not the stale duplicate 2


def test_a_late_reply_after_the_client_gave_up_answers_nothing(peer: RawPeer) -> None:
    with Client(peer.endpoint, settings=FAST) as client:
        abandoned = client.submit({"op": "work"})
        routing, _ = peer.next_request()
        with pytest.raises(PeerGone):  # the peer says nothing, not even heartbeats
            client.result(abandoned, timeout=30)
        retry = client.submit({"op": "work"})  # a retry is a new request with a new id
        _, header = peer.next_request()
        assert header["request_id"] == retry != abandoned
        peer.reply(routing, abandoned, 1)  # the first attempt's answer comes at last
        peer.reply(routing, retry, 2)
        assert client.result(retry, timeout=10)["value"] == 2


def test_a_caller_chosen_id_cannot_be_reused_while_outstanding(peer: RawPeer) -> None:
    with Client(peer.endpoint, settings=FAST) as client:
        client.submit({"op": "work", "request_id": "job-1"})
        with pytest.raises(ValueError, match="already outstanding"):
            client.submit({"op": "work", "request_id": "job-1"})
        client.cancel("job-1")


def test_settings_for_a_timeout_beat_several_times_within_it() -> None:
    assert settings_for_timeout(10.0).heartbeat_interval == 0.5
    short = settings_for_timeout(1.0)
    assert short.heartbeat_timeout == 1.0 and short.heartbeat_interval == pytest.approx(0.2)
    with pytest.raises(ValueError):
        settings_for_timeout(0.0)


# -- large messages: beats wait behind them, so the client allows for their transfer ----------------

#: 30 s per MiB: any message here is "under way" far longer than the peer below stays silent.
SLOW_LINK = Settings(heartbeat_interval=0.1, heartbeat_timeout=1.0, min_transfer_rate=(1 << 20) / 30)
SILENT_S = 2.0  # twice the heartbeat timeout


def test_an_announced_large_reply_is_waited_for(peer: RawPeer) -> None:
    with Client(peer.endpoint, settings=SLOW_LINK) as client:
        request = client.submit({"op": "work"})
        routing, _ = peer.next_request()
        announcement = {"op": "progress", "request_id": request, "incoming_bytes": 1 << 20}
        peer.sock.send_multipart([routing, *encode(announcement)])
        time.sleep(SILENT_S)  # silent past the heartbeat timeout, as while a large reply is on the wire
        peer.reply(routing, request, 7)
        seen: list[dict] = []
        assert client.result(request, timeout=30, on_progress=seen.append)["value"] == 7
        assert seen == []  # the announcement is the transport's business, not the caller's


def test_a_large_request_is_allowed_its_transfer_time(peer: RawPeer) -> None:
    with Client(peer.endpoint, settings=SLOW_LINK) as client:
        request = client.submit({"op": "work", "data": torch.zeros(1 << 18)})  # 1 MiB of float32
        routing, header = peer.next_request()
        assert header["data"].numel() == 1 << 18
        time.sleep(SILENT_S)
        peer.reply(routing, request, 8)
        assert client.result(request, timeout=30)["value"] == 8


def test_a_server_announces_a_large_reply() -> None:
    big = torch.arange(ANNOUNCE_BYTES // 4 + 1024, dtype=torch.float32)
    with Server(settings=FAST) as server:
        def answer() -> None:
            request = server.recv(timeout=30)
            assert request is not None
            server.reply(request, {"op": "result", "x": big})

        thread = threading.Thread(target=answer, name="test-announcing-server")
        thread.start()
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        try:
            dealer.connect(server.endpoint)
            dealer.send_multipart(encode({"op": "work", "request_id": "r1"}))
            ops = []
            while len(ops) < 2:
                assert dealer.poll(WAIT_MS)
                header = decode(dealer.recv_multipart(copy=False))
                if header["op"] != OP_HEARTBEAT:
                    ops.append(header)
            assert ops[0]["op"] == "progress" and ops[0]["incoming_bytes"] > big.numel() * 4
            assert ops[1]["op"] == "result" and torch.equal(ops[1]["x"], big)
        finally:
            dealer.close()
            context.term()
            thread.join(30)
