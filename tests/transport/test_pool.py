"""One connection pool per process: leases share a connection, idle ones close, discard closes for all."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from diffsplit.transport.errors import TransportError
from diffsplit.transport.pool import ClientPool
from diffsplit.transport.protocol import Settings
from diffsplit.transport.sockets import Request, Server


@pytest.fixture
def echo_address() -> Iterator[str]:
    """A real server on loopback that answers every request with its op and its connection."""
    server = Server("tcp://127.0.0.1:*")

    def serve() -> None:
        while True:
            request: Request | None = server.recv(timeout=0.05)
            if request is None:
                if stopping.is_set():
                    return
                continue
            server.reply(request, {"op": "result", "peer": request.peer.hex()})

    stopping = threading.Event()
    thread = threading.Thread(target=serve, name="diffsplit-test-echo")
    thread.start()
    try:
        yield server.endpoint
    finally:
        stopping.set()
        thread.join(10)
        server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_leases_of_one_address_share_one_connection(echo_address: str) -> None:
    pool = ClientPool()
    try:
        first, second = pool.lease(echo_address), pool.lease(echo_address)
        assert first.client is second.client and pool.connections() == 1
        peers = {first.client.request({"op": "ping"}, timeout=10)["peer"],
                 second.client.request({"op": "ping"}, timeout=10)["peer"]}
        assert len(peers) == 1  # the server saw one connection
        other = pool.lease(echo_address, settings=Settings(heartbeat_interval=0.4))
        assert other.client is not first.client and pool.connections() == 2  # other settings, other client
        for lease in (first, second, other):
            lease.release()
        first.release()  # idempotent: it does not give back someone else's lease
        again = pool.lease(echo_address)
        assert again.client is second.client  # kept for the next lease
        again.release()
    finally:
        pool.close()
    assert pool.connections() == 0


def test_an_idle_connection_closes_after_keep_s_and_a_leased_one_never(echo_address: str) -> None:
    clock = Clock()
    pool = ClientPool(keep_s=5.0, clock=clock)
    try:
        idle = pool.lease(echo_address)
        idle_client = idle.client
        held = pool.lease(echo_address, settings=Settings(heartbeat_interval=0.4))
        idle.release()
        clock.now = 4.9
        assert pool.close_idle() == 1 and idle_client.closed  # close_idle does not wait for keep_s
        again = pool.lease(echo_address)
        assert again.client is not idle_client
        again.release()
        clock.now = 20.0
        with pool.lease(echo_address, settings=Settings(heartbeat_interval=0.3)) as third:  # a pool call
            assert not third.closed
        assert again.client.closed and not held.client.closed  # expired while idle; leased: kept
        assert held.client.request({"op": "ping"}, timeout=10)["op"] == "result"
        held.release()
    finally:
        pool.close()


def test_discard_closes_for_every_holder_and_the_next_lease_connects_again(echo_address: str) -> None:
    pool = ClientPool()
    try:
        first, second = pool.lease(echo_address), pool.lease(echo_address)
        pool.discard(first.client)
        assert second.client.closed
        with pytest.raises(TransportError):
            second.client.request({"op": "ping"}, timeout=10)
        fresh = pool.lease(echo_address)
        assert fresh.client is not first.client
        assert fresh.client.request({"op": "ping"}, timeout=10)["op"] == "result"
        for lease in (first, second, fresh):
            lease.release()
    finally:
        pool.close()


def test_a_bad_endpoint_is_a_transport_error_and_leaves_nothing_behind() -> None:
    pool = ClientPool()
    try:
        with pytest.raises(TransportError, match="cannot connect"):
            pool.lease("no-such-transport://x")
        assert pool.connections() == 0
    finally:
        pool.close()


def test_bad_keep_s_is_refused() -> None:
    with pytest.raises(ValueError, match="keep_s"):
        ClientPool(keep_s=-1)
