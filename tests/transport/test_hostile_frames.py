"""What a hostile peer's frames cannot do to either end of a connection.

Every tensor table that passes validation can be built; every error quotes the
peer's values briefly and every error reply is small; no message, however
made, ends the server's or the client's I/O thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from diffsplit.transport import server as server_module
from diffsplit.transport import sockets as sockets_module
from diffsplit.transport.codec import validate_table
from diffsplit.transport.envelope import DEFAULT_LIMITS, MAGIC, VERSION, decode, encode
from diffsplit.transport.errors import MalformedMessage, MessageTooLarge, TransportError
from diffsplit.transport.protocol import MAX_REQUEST_ID_CHARS, error_message
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, clip, shown
from diffsplit.transport.sockets import Client, Server, Settings
from diffsplit.transport.tensors import ITEMSIZE, KIND_NUMPY_SCALAR, KIND_TORCH, NUMPY_DTYPES, from_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = Settings(heartbeat_interval=0.1, heartbeat_timeout=5.0)
WAIT = 15.0  # a generous bound on every wait, never a timing assertion
MAX_HEADER = DEFAULT_LIMITS.max_header_bytes
REF0 = msgpack.ExtType(2, (0).to_bytes(4, "big"))
PROPERTY = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def message(table: Any, body: Any, *frames: bytes) -> list[bytes]:
    """Hand-made parts: any table and body, packed as the envelope would be."""
    header = msgpack.packb(table, use_bin_type=True) + msgpack.packb(body, use_bin_type=True)
    return [MAGIC, VERSION, header, *frames]


def fail(*args: object) -> None:
    """A stand-in for a function with a bug."""
    raise RuntimeError("a bug")


def wire_bytes(parts: list[Any]) -> int:
    return sum(len(memoryview(p).cast("B")) for p in parts)


# The tensor table -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dtype", "shape"),
    [
        (KIND_TORCH, "float32", [2**64 - 1, 0]),  # torch.empty: TypeError (the 60-byte message)
        (KIND_TORCH, "int64", [2**31, 2**31, 2**31, 2**31, 0]),  # torch: stride overflow
        (1, "float64", [2**31, 0, 2**31]),  # numpy: "array is too big"
        (1, "uint8", [2**63, 0]),
    ],
)
def test_an_empty_tensor_with_huge_dims_is_refused_before_anything_is_built(
    kind: int, dtype: str, shape: list[int]
) -> None:
    parts = message([[kind, dtype, shape, b""]], {"op": "hello", "request_id": "r", "t": REF0})
    with pytest.raises(MessageTooLarge, match="spans"):
        decode(parts)


def test_ordinary_empty_tensors_still_travel() -> None:
    header = {"t": torch.empty(0, 4, 64), "a": np.empty((3, 0, 7), dtype=np.float16), "e": torch.empty(0)}
    out = decode(encode(header))
    assert out["t"].shape == (0, 4, 64) and out["a"].shape == (3, 0, 7) and out["e"].shape == (0,)


_DIMS = st.one_of(
    st.integers(0, 4),
    st.sampled_from([2**16, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
_DTYPES = st.sampled_from([*sorted(ITEMSIZE), "object", "float128", "", "V8", "<f4"])


@st.composite
def descriptors(draw: st.DrawFn) -> list[Any]:
    kind = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(-3, 5)))
    dtype = draw(_DTYPES)
    shape = draw(st.lists(_DIMS, max_size=9))
    size = ITEMSIZE.get(dtype, 1)
    for d in shape:
        size *= d
    fill = draw(st.sampled_from([b"\x00", b"\x01", b"\xff"]))
    loc = fill * size if size <= 4096 else draw(st.binary(max_size=16))
    return [kind, dtype, shape, loc]


@PROPERTY
@given(st.lists(descriptors(), max_size=4))
def test_every_table_that_validates_can_be_built(table: list[Any]) -> None:
    try:
        checked = validate_table(table, [], DEFAULT_LIMITS)
    except TransportError as exc:  # refused: fine, as long as the reason is short
        assert len(str(exc)) < 400
        return
    for desc in checked:
        built = from_bytes(desc.kind, desc.dtype, desc.shape, desc.data)
        if desc.kind == KIND_NUMPY_SCALAR:
            assert isinstance(built, np.generic)
        else:
            assert tuple(built.shape) == desc.shape
        if desc.kind != KIND_TORCH:
            assert desc.dtype in NUMPY_DTYPES


# Bounded errors -------------------------------------------------------------

_HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    "table",
    [
        [[0, _HUGE, [1], b"\x00"]],  # dtype
        [[_HUGE, "float32", [1], b"\x00"]],  # kind
        [[0, "float32", [_HUGE], b"\x00"]],  # shape
        [[0, "float32", _HUGE, b"\x00"]],  # shape, not a list
        [[0, "float32", [-1] * 8, b"\x00"]],
        [[2, "float32", [1] * 8, b"\x00"]],  # a scalar with a shape
        [[0, "float32", [1], 2**60]],  # a frame that does not exist
    ],
    ids=["dtype", "kind", "dim", "shape", "negative", "scalar", "frame"],
)
def test_errors_quote_what_the_peer_sent_briefly(table: list[Any]) -> None:
    with pytest.raises((MalformedMessage, MessageTooLarge)) as caught:
        decode(message(table, {"op": "x", "request_id": "r", "t": REF0}))
    assert len(str(caught.value)) < 300


def test_a_map_key_is_quoted_briefly() -> None:
    tuple_mark = msgpack.ExtType(1, b"")
    with pytest.raises(MalformedMessage, match="tuple marker") as caught:
        decode(message([], {"op": "x", _HUGE: tuple_mark}))
    assert len(str(caught.value)) < 300


def test_an_error_reply_is_small_whatever_its_texts() -> None:
    parts = error_message("r" * (MAX_REQUEST_ID_CHARS + 1), "K" * 1_000_000, "m" * 10_000_000)
    assert wire_bytes(parts) < 4 * MAX_MESSAGE_CHARS
    reply = decode(parts)
    assert reply["request_id"] is None  # an id longer than any server accepts is not echoed
    assert reply["error"]["message"].endswith("[10000000 chars, cut]")
    assert len(reply["error"]["message"]) == MAX_MESSAGE_CHARS


def test_shown_and_clip_are_bounded() -> None:
    for value in (_HUGE, [2**64 - 1] * 100_000, b"\x00" * 10**6, {_HUGE: [[[[1]]]]}, "a\nb\x1b[31m"):
        text = shown(value)
        assert len(text) <= 80 and "\n" not in text and "\x1b" not in text
    assert clip("short", 10) == "short" and len(clip(_HUGE, 100)) == 100


def test_a_header_of_a_million_empty_arrays_is_refused_early() -> None:
    with pytest.raises(MessageTooLarge, match="arrays and maps"):
        decode(message([], {"op": "x", "request_id": "r", "junk": [[]] * 1_000_000}))
    many = decode(message([], {"op": "x", "junk": [[1]] * 50_000}))  # plenty for real headers
    assert len(many["junk"]) == 50_000


# Both ends of a real connection ---------------------------------------------


def _answer(srv: Server, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            request = srv.recv(timeout=0.1)
        except TransportError:
            return
        if request is not None:
            srv.reply(request, {"op": "result", "ok": True})


@pytest.fixture
def server() -> Iterator[Server]:
    stop = threading.Event()
    with Server("tcp://127.0.0.1:*", settings=SETTINGS) as srv:
        thread = threading.Thread(target=_answer, args=(srv, stop), name="diffsplit-test-answer")
        thread.start()
        yield srv
        stop.set()
        thread.join(WAIT)


@pytest.fixture
def peer(server: Server) -> Iterator[zmq.Socket[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    yield sock
    sock.close(linger=0)
    context.term()


def next_reply(sock: zmq.Socket[Any]) -> dict[str, Any]:
    """The next message that is not a heartbeat, decoded."""
    while True:
        assert sock.poll(int(WAIT * 1000)), "no reply"
        reply = decode(sock.recv_multipart())
        if reply["op"] != "heartbeat":
            return reply


def still_serves(srv: Server) -> bool:
    with Client(srv.endpoint, settings=SETTINGS) as client:
        return client.request({"op": "ping"}, timeout=WAIT)["ok"] is True


def test_the_server_answers_hostile_frames_and_goes_on(server: Server, peer: zmq.Socket[Any]) -> None:
    peer.send_multipart(message([[0, "float32", [2**64 - 1, 0], b""]], {"op": "hello", "request_id": "a",
                                                                        "t": REF0}))
    refused = next_reply(peer)
    assert refused["op"] == "error" and refused["request_id"] is None
    assert refused["error"]["kind"] == "MessageTooLarge"
    # an error quoting this dtype whole would not fit in a header: it used to end the I/O thread
    dtype = "x" * (MAX_HEADER - 40)
    peer.send_multipart(message([[0, dtype, [1], b""]], {"op": "hello", "request_id": "a"}))
    refused = next_reply(peer)
    assert refused["error"]["kind"] == "MalformedMessage" and len(refused["error"]["message"]) < 300
    peer.send_multipart(message([], {"op": "hello", "request_id": "r" * (MAX_HEADER - 100)}))
    too_long = next_reply(peer)
    assert too_long["error"]["kind"] == "BadRequest" and "request_id" in too_long["error"]["message"]
    peer.send_multipart([b"\x00", b"junk"])
    assert next_reply(peer)["error"]["kind"] == "MalformedMessage"
    assert still_serves(server)


def test_a_failure_while_handling_a_message_is_answered_not_fatal(
    server: Server, peer: zmq.Socket[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = server_module.decode

    def buggy_decode(parts: Any, limits: Any) -> dict[str, Any]:
        header = real_decode(parts, limits)
        if header.get("op") == "boom":
            raise RuntimeError("a decoder bug")
        return header

    monkeypatch.setattr(server_module, "decode", buggy_decode)
    peer.send_multipart(encode({"op": "boom", "request_id": "b"}))
    reply = next_reply(peer)
    assert reply["op"] == "error" and reply["error"]["kind"] == "RuntimeError"
    assert "a decoder bug" in reply["error"]["message"]
    # even when the error reply fails too, the message is dropped and the thread goes on
    monkeypatch.setattr(Server, "_send_error", fail)
    peer.send_multipart(encode({"op": "boom", "request_id": "c"}))
    assert still_serves(server)


# A hostile server against a real Client -------------------------------------


@pytest.fixture
def hostile_server() -> Iterator[tuple[zmq.Socket[Any], str]]:
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    context.term()


def next_request(sock: zmq.Socket[Any]) -> tuple[bytes, dict[str, Any]]:
    while True:
        assert sock.poll(int(WAIT * 1000)), "no request"
        peer, *parts = sock.recv_multipart()
        header = decode(parts)
        if header["op"] != "heartbeat":
            return peer, header


def test_a_client_survives_a_hostile_server(
    hostile_server: tuple[zmq.Socket[Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, endpoint = hostile_server
    with Client(endpoint, settings=SETTINGS) as client:
        request_id = client.submit({"op": "work"})
        peer, _ = next_request(sock)
        body = {"op": "result", "request_id": request_id, "t": REF0}
        sock.send_multipart([peer, *message([[0, "float32", [2**64 - 1, 0], b""]], body)])
        with pytest.raises(MessageTooLarge, match="unreadable message"):
            client.result(request_id, timeout=WAIT)
        # a bug while handling a reply fails the waiting request clearly, and the client goes on
        request_id = client.submit({"op": "work"})
        peer, _ = next_request(sock)
        monkeypatch.setattr(sockets_module, "describe", fail)
        sock.send_multipart([peer, *encode({"op": "result", "request_id": request_id})])
        with pytest.raises(TransportError, match="could not be handled"):
            client.result(request_id, timeout=WAIT)
        monkeypatch.undo()
        request_id = client.submit({"op": "work"})
        peer, _ = next_request(sock)
        sock.send_multipart([peer, *encode({"op": "result", "request_id": request_id, "fine": 1})])
        assert client.result(request_id, timeout=WAIT)["fine"] == 1


def test_a_client_refuses_a_request_id_no_server_accepts() -> None:
    with Server(settings=SETTINGS) as srv, Client(srv.endpoint, settings=SETTINGS) as client, \
            pytest.raises(ValueError, match="at most 256"):
        client.submit({"op": "x", "request_id": "r" * (MAX_REQUEST_ID_CHARS + 1)})
