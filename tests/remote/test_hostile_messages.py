"""Nothing a peer sends stops a worker; a worker that breaks anyway exits non-zero.

Each attack is sent over a raw DEALER socket to a real worker on loopback (in
process, or a ``diffsplit worker`` child): the sender gets an error reply and
the worker still answers ``hello`` afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from diffsplit.engine.nodes.base import NodeClass, OutputSpec
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.remote.worker import Worker, WorkerConfig, WorkerFailed, bounded_error
from diffsplit.transport.envelope import DEFAULT_LIMITS, MAGIC, VERSION, decode, encode
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS
from diffsplit.transport.sockets import Client

from diffsplit.commands import EXIT_WORKER_FAILED
from diffsplit.demo import READY_PREFIX

WAIT = 30.0  # a generous bound on every wait, never a timing assertion
MAX_HEADER = DEFAULT_LIMITS.max_header_bytes
REF0 = msgpack.ExtType(2, (0).to_bytes(4, "big"))


def raw_message(table: Any, body: Any) -> list[bytes]:
    """Parts packed by hand: any table and body, as a hostile peer would."""
    return [MAGIC, VERSION, msgpack.packb(table, use_bin_type=True) + msgpack.packb(body, use_bin_type=True)]


#: The finding: 60 bytes whose zero-size tensor [2**64-1, 0] passed the size check and stopped the daemon.
SIXTY_BYTES = raw_message([[0, "float32", [2**64 - 1, 0], b""]],
                          {"op": "hello", "request_id": "a", "t": REF0})
#: An error quoting this dtype whole would not fit in a reply header: the I/O thread died sending it.
HUGE_DTYPE = raw_message([[0, "x" * (MAX_HEADER - 40), [1], b""]], {"op": "hello", "request_id": "a"})
#: ... and this shape, whose repr is four times its msgpack.
HUGE_SHAPE = raw_message([[0, "float32", [-1] * 1_000_000, b""]], {"op": "hello", "request_id": "a"})


class Peer:
    """A raw DEALER on loopback: sends any parts, reads replies (heartbeats skipped)."""

    def __init__(self, endpoint: str) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, parts: list[Any]) -> None:
        self.sock.send_multipart(parts)

    def reply(self) -> tuple[dict[str, Any], int]:
        """The next reply that is not a heartbeat, and its size on the wire."""
        while True:
            assert self.sock.poll(int(WAIT * 1000)), "the worker sent no reply"
            parts = self.sock.recv_multipart()
            reply = decode(parts)
            if reply["op"] != "heartbeat":
                return reply, sum(len(p) for p in parts)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def answers_hello(endpoint: str) -> bool:
    with Client(endpoint) as client:
        return client.request({"op": "hello"}, timeout=WAIT)["op"] == "result"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """An in-process worker on loopback with an empty store."""
    daemon = Worker(WorkerConfig(models=tmp_path_factory.mktemp("models"), listen="tcp://127.0.0.1:*",
                                 grace_s=1.0))
    thread = threading.Thread(target=daemon.serve, name="diffsplit-test-serve")
    thread.start()
    yield daemon
    daemon.stop()
    thread.join(WAIT)


@pytest.fixture
def peer(worker: Worker) -> Iterator[Peer]:
    sock = Peer(worker.endpoint)
    yield sock
    sock.close()


@pytest.mark.parametrize("attack", [SIXTY_BYTES, HUGE_DTYPE, HUGE_SHAPE], ids=["60-bytes", "dtype", "shape"])
def test_a_hostile_table_is_answered_and_the_worker_goes_on(
    worker: Worker, peer: Peer, attack: list[bytes]
) -> None:
    assert attack is not SIXTY_BYTES or sum(len(p) for p in attack) == 60
    peer.send(attack)
    reply, size = peer.reply()
    assert reply["op"] == "error" and reply["request_id"] is None  # could not be read: no request id
    assert reply["error"]["kind"] in {"MalformedMessage", "MessageTooLarge"}
    assert size < 4096
    assert answers_hello(worker.endpoint)


def test_a_request_id_too_long_to_echo_gets_an_error(worker: Worker, peer: Peer) -> None:
    # every reply echoes the id: one this long made every reply, error replies too, over the limit
    peer.send(encode({"op": "hello", "request_id": "r" * (MAX_HEADER - 100)}))
    reply, size = peer.reply()
    assert reply["op"] == "error" and reply["error"]["kind"] == "BadRequest" and size < 4096
    assert answers_hello(worker.endpoint)


@pytest.mark.parametrize(("op", "class_type"), [("o" * (MAX_HEADER - 100), "KSampler"),
                                                ("run_node", "c" * (MAX_HEADER - 200))], ids=["op", "node"])
def test_what_a_peer_sent_is_quoted_briefly_in_worker_errors(
    worker: Worker, peer: Peer, op: str, class_type: str
) -> None:
    header = {"op": op, "request_id": "q", "node": {"id": "1", "class_type": class_type}, "inputs": {}}
    peer.send(encode(header))
    reply, size = peer.reply()
    assert reply["op"] == "error" and reply["request_id"] == "q"
    assert reply["error"]["kind"] == "BadRequest", reply["error"]  # not "the reply could not be sent"
    assert len(reply["error"]["message"]) < 400 and size < 4096
    assert answers_hello(worker.endpoint)


def test_a_worker_error_reply_is_bounded_whatever_it_carries() -> None:
    huge = {"kind": "NodeFailed", "message": "m" * 10_000_000, "traceback": "t" * 10_000_000,
            "digests": ["d" * 100_000] * 100_000, "bytes": 5}
    error = bounded_error(huge)
    assert len(error["message"]) == MAX_MESSAGE_CHARS and len(error["traceback"]) == MAX_TRACEBACK_CHARS
    assert error["bytes"] == 5 and error["kind"] == "NodeFailed"
    parts = encode({"op": "error", "request_id": "r" * 256, "error": error})  # fits the header limit
    assert sum(len(memoryview(p)) for p in parts) < MAX_HEADER


def exits(code: int) -> NodeClass:
    def function(context: Any) -> tuple[Any, ...]:
        sys.exit(code)

    return NodeClass("Exit", (), (OutputSpec("NUMBER", "NUMBER"),), function)


def test_a_dead_slot_thread_stops_the_worker_with_a_failure(tmp_path: Path) -> None:
    # a node that calls sys.exit() ends its slot thread (SystemExit is no Exception)
    daemon = Worker(WorkerConfig(models=tmp_path, listen="tcp://127.0.0.1:*", grace_s=1.0),
                    registry=default_registry().with_nodes(exits(3)))
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.serve()
        except WorkerFailed as exc:
            failures.append(exc)

    thread = threading.Thread(target=serve, name="diffsplit-test-serve")
    thread.start()
    try:
        with Client(daemon.endpoint) as client:
            run = {"op": "run_node", "node": {"id": "7", "class_type": "Exit"}, "inputs": {}}
            reply = client.request(run, timeout=WAIT)
        assert reply["op"] == "error" and reply["error"]["kind"] == "NodeFailed"
        assert "slot" in reply["error"]["message"] and "SystemExit" in reply["error"]["message"]
        thread.join(WAIT)
        assert not thread.is_alive(), "the worker went on serving without a slot"
    finally:
        daemon.stop()
        thread.join(WAIT)
    assert len(failures) == 1 and "diffsplit-slot-0 died: SystemExit" in str(failures[0])
    assert daemon.failure is not None


def start_worker(command: list[str], models: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [*command, "worker", "--models", str(models), "--listen", "tcp://127.0.0.1:*", "--grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(READY_PREFIX):
        process.kill()
        raise AssertionError(f"the worker did not start: {line!r} {process.communicate(timeout=WAIT)}")
    return process, line[len(READY_PREFIX):].split()[0]


def test_a_worker_process_survives_every_finding_and_still_stops_with_0(tmp_path: Path) -> None:
    process, address = start_worker([sys.executable, "-m", "diffsplit.cli"], tmp_path)
    try:
        peer = Peer(address)
        try:
            for attack in (SIXTY_BYTES, HUGE_DTYPE, HUGE_SHAPE):
                peer.send(attack)
                reply, _ = peer.reply()
                assert reply["op"] == "error"
        finally:
            peer.close()
        assert answers_hello(address)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stderr  # a stop asked for (SIGTERM) is a clean exit


#: Runs ``diffsplit worker`` with its server's heartbeat tick failing once a client was heard:
#: an internal failure that ends the server's I/O thread (no message can do that any more).
BREAK_IO_THREAD = textwrap.dedent("""
    import sys
    from diffsplit.cli import main
    from diffsplit.transport.server import Server

    tick = Server._on_tick

    def failing_tick(self, now):
        if self._last_heard:
            raise RuntimeError("injected failure of the I/O thread")
        tick(self, now)

    Server._on_tick = failing_tick
    sys.exit(main(sys.argv[1:]))
""")


def test_a_worker_whose_io_thread_dies_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    script = tmp_path / "break_io_thread.py"
    script.write_text(BREAK_IO_THREAD)
    models = tmp_path / "models"
    models.mkdir()
    process, address = start_worker([sys.executable, str(script)], models)
    try:
        peer = Peer(address)  # open until the worker exits: a closed DEALER drops what it has not sent
        try:
            peer.send(encode({"op": "hello", "request_id": "h"}))  # the tick after it fails
            _, stderr = process.communicate(timeout=WAIT)
        finally:
            peer.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == EXIT_WORKER_FAILED, stderr
    assert "diffsplit worker failed" in stderr and "I/O thread" in stderr
    assert "injected failure of the I/O thread" in stderr
