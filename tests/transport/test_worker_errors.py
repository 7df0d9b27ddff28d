"""One structured error on the wire, the same typed exception at both ends."""

from __future__ import annotations

import pytest
from diffsplit.engine.call_offload import OffloadError
from diffsplit.engine.errors import EngineError
from diffsplit.engine.offload import RemoteNodeError
from diffsplit.transport.codec import pack
from diffsplit.transport.envelope import decode, encode
from diffsplit.transport.shown import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS
from diffsplit.transport.worker_errors import (
    MAX_ERROR_FIELD_CHARS,
    MAX_ERROR_ITEMS,
    BadRequest,
    Cancelled,
    MissingModel,
    NodeFailed,
    NotHeld,
    Overloaded,
    WorkerError,
    error_from_reply,
    error_reply,
    is_error_reply,
    with_context,
)

SHA = "ab" * 32


def through_the_wire(error: WorkerError) -> WorkerError:
    """What a client decodes from the reply a worker sends for ``error`` (through the real envelope)."""
    reply = decode(encode({**error_reply(error), "request_id": "r1"}))
    assert is_error_reply(reply)
    return error_from_reply(reply)


@pytest.mark.parametrize("error", [
    BadRequest("no such op"), Overloaded("the queue is full"), Cancelled("deadline passed"),
    MissingModel("checkpoints/x.safetensors", SHA, 1234), NotHeld(["d1", "d2"]),
    NodeFailed("KSampler raised", "Traceback (most recent call last):\n  ...\nValueError: x"),
], ids=lambda error: error.kind)
def test_every_kind_comes_back_as_its_own_class_with_its_fields(error: WorkerError) -> None:
    back = through_the_wire(error)
    assert type(back) is type(error)
    assert back.message == error.message and back.remote_traceback == error.remote_traceback
    assert back.to_reply() == error.to_reply()


def test_missing_model_and_not_held_keep_what_the_client_acts_on() -> None:
    missing = through_the_wire(MissingModel("loras/a.safetensors", SHA, 77))
    assert isinstance(missing, MissingModel)
    assert (missing.name, missing.sha256, missing.size) == ("loras/a.safetensors", SHA, 77)
    held = through_the_wire(NotHeld(["d1", "d2"]))
    assert isinstance(held, NotHeld) and held.digests == ["d1", "d2"]
    failed = through_the_wire(NodeFailed("boom", "the worker's traceback"))
    assert isinstance(failed, NodeFailed) and failed.traceback_text == "the worker's traceback"


@pytest.mark.parametrize("raw", [
    None, "not a mapping", 7, [], {}, {"kind": 5, "message": ["x"]},
    {"kind": "MissingModel", "bytes": True, "name": 3},  # wrong field types
    {"kind": "NotHeld", "digests": "not a list"},
    {"kind": "NotHeld", "digests": [1, "d", None]},
])
def test_whatever_a_peer_sends_decodes_without_raising(raw: object) -> None:
    error = error_from_reply({"op": "error", "error": raw})
    assert isinstance(error, WorkerError) and error.message
    if isinstance(error, MissingModel):
        assert error.size is None and error.name == ""
    if isinstance(error, NotHeld):
        assert all(isinstance(digest, str) for digest in error.digests)


def test_an_unknown_kind_keeps_the_peers_name() -> None:
    error = error_from_reply({"op": "error", "error": {"kind": "FromTheFuture", "message": "m"}})
    assert type(error) is WorkerError and error.kind == "FromTheFuture"
    assert WorkerError.kind == "WorkerError"  # the class is left alone
    long_kind = error_from_reply({"op": "error", "error": {"kind": "K" * 10_000, "message": "m"}})
    assert len(long_kind.kind) <= 64


def test_decoded_errors_are_cut_to_size() -> None:
    raw = {"kind": "NotHeld", "message": "m" * 100_000, "traceback": "t" * 100_000,
           "digests": ["d" * 10_000] * 10_000, "extra": "x" * 100_000}
    error = error_from_reply({"op": "error", "error": raw})
    assert isinstance(error, NotHeld)
    assert len(error.message) <= MAX_MESSAGE_CHARS and len(error.remote_traceback) <= MAX_TRACEBACK_CHARS
    assert len(error.digests) == MAX_ERROR_ITEMS
    assert all(len(digest) <= MAX_ERROR_FIELD_CHARS for digest in error.digests)
    assert len(pack(error_reply(error))) < MAX_MESSAGE_CHARS + MAX_TRACEBACK_CHARS + 1_100_000


def test_a_client_error_is_also_the_workers_typed_error() -> None:
    told = through_the_wire(MissingModel("checkpoints/x.safetensors", SHA, 9))
    assert isinstance(told, MissingModel)
    raised = RemoteNodeError.of("6", "KSampler", "tcp://w:1", told)
    assert isinstance(raised, RemoteNodeError) and isinstance(raised, EngineError)
    assert isinstance(raised, MissingModel) and not isinstance(raised, NotHeld)
    assert raised.sha256 == SHA and raised.kind == "MissingModel" and raised.error["name"] == told.name
    assert str(raised).startswith("node 6 (KSampler) on tcp://w:1: MissingModel: model file")
    assert raised.__cause__ is told
    with pytest.raises(MissingModel):
        raise raised
    offload = with_context(through_the_wire(Overloaded("full")), OffloadError, "worker w: Overloaded: full")
    assert isinstance(offload, OffloadError) and isinstance(offload, Overloaded)
    assert type(offload) is type(with_context(Overloaded("again"), OffloadError, "m"))  # one class per pair
