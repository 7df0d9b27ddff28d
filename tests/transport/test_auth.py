"""CURVE: key files, encrypted and authenticated round trips, wrong keys get nothing."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator

import pytest
import torch
import zmq.auth
from diffsplit.transport.auth import (
    ClientCurve,
    KeyPair,
    ServerCurve,
    generate_keypair,
    load_keypair,
    load_public_keys,
    save_keypair,
)
from diffsplit.transport.errors import PeerGone, TransportError
from diffsplit.transport.sockets import Client, Request, Server, Settings

FAST = Settings(heartbeat_interval=0.05, heartbeat_timeout=1.0)  # roomy on a loaded machine
WAIT = 10.0


def test_keypairs_are_fresh_z85_pairs() -> None:
    a, b = generate_keypair(), generate_keypair()
    assert len(a.public) == len(a.secret) == 40 and a.public != b.public
    assert a.secret is not None and a.secret.decode() not in repr(a)


def test_key_files_round_trip(tmp_path) -> None:
    pair = generate_keypair()
    public_path, secret_path = save_keypair(pair, tmp_path / "keys", "server")
    assert public_path.name == "server.key" and secret_path is not None
    if os.name == "posix":
        assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert load_keypair(secret_path) == pair
    assert load_keypair(public_path) == KeyPair(pair.public, None)
    assert zmq.auth.load_certificate(secret_path) == (pair.public, pair.secret)  # pyzmq's format
    other = generate_keypair()
    save_keypair(KeyPair(other.public), tmp_path / "keys", "client")
    assert load_public_keys(tmp_path / "keys") == {pair.public, other.public}
    with pytest.raises(TransportError, match="cannot read CURVE key file"):
        load_keypair(tmp_path / "missing.key")


class Echo:
    """A CURVE server whose handler answers every request with who the client was."""

    def __init__(self, curve: ServerCurve) -> None:
        self.server = Server(settings=FAST, curve=curve)
        self.requests: list[Request] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                request = self.server.recv(timeout=0.1)
            except TransportError:
                return
            if request is not None:
                self.requests.append(request)
                reply = {"op": "result", "key": request.client_key, "x": request.header.get("x")}
                self.server.reply(request, reply)

    def close(self) -> None:
        self.server.close()
        self.thread.join(WAIT)


@pytest.fixture
def keys() -> tuple[KeyPair, KeyPair]:
    return generate_keypair(), generate_keypair()


@pytest.fixture
def allow_listed(keys) -> Iterator[Echo]:
    server_keys, client_keys = keys
    echo = Echo(ServerCurve(server_keys, allowed_clients=frozenset({client_keys.public})))
    yield echo
    echo.close()


def test_authenticated_round_trip(allow_listed: Echo, keys) -> None:
    server_keys, client_keys = keys
    assert allow_listed.server.is_authenticated
    curve = ClientCurve(server_keys.public, client_keys)
    with Client(allow_listed.server.endpoint, settings=FAST, curve=curve) as c:
        t = torch.randn(256, 256)
        reply = c.request({"op": "who", "x": t}, timeout=WAIT)
    assert reply["key"] == client_keys.public.decode()
    assert torch.equal(reply["x"], t)
    assert allow_listed.requests[0].authenticated


def test_client_off_the_allow_list_gets_nothing(allow_listed: Echo, keys) -> None:
    server_keys, _ = keys
    stranger = ClientCurve(server_keys.public)  # a fresh key the server does not know
    endpoint = allow_listed.server.endpoint
    with Client(endpoint, settings=FAST, curve=stranger) as c, pytest.raises(PeerGone, match="CURVE"):
        c.request({"op": "who"}, timeout=WAIT)
    assert allow_listed.requests == []


def test_wrong_server_key_gets_no_reply(allow_listed: Echo, keys) -> None:
    _, client_keys = keys
    impostor = ClientCurve(generate_keypair().public, client_keys)
    endpoint = allow_listed.server.endpoint
    with Client(endpoint, settings=FAST, curve=impostor) as c, pytest.raises(PeerGone, match="wrong server"):
        c.request({"op": "who"}, timeout=WAIT)
    assert allow_listed.requests == []


def test_plain_client_cannot_talk_to_a_curve_server(allow_listed: Echo) -> None:
    with Client(allow_listed.server.endpoint, settings=FAST) as c, pytest.raises(PeerGone):
        c.request({"op": "who"}, timeout=WAIT)
    assert allow_listed.requests == []


def test_encrypted_without_allow_list_is_not_authenticated(keys) -> None:
    server_keys, _ = keys
    echo = Echo(ServerCurve(server_keys))
    try:
        assert not echo.server.is_authenticated
        with Client(echo.server.endpoint, settings=FAST, curve=ClientCurve(server_keys.public)) as c:
            assert c.request({"op": "who", "x": 1}, timeout=WAIT) == {
                "op": "result",
                "key": None,
                "x": 1,
                "request_id": echo.requests[0].request_id,
            }
        assert not echo.requests[0].authenticated
    finally:
        echo.close()


def test_server_needs_its_secret_key(keys) -> None:
    server_keys, _ = keys
    with pytest.raises(TransportError, match="secret key"):
        Server(settings=FAST, curve=ServerCurve(KeyPair(server_keys.public)))
