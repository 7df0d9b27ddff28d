"""The worker's ops as types: what a client builds is what the worker parses; bad fields are named."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffsplit.transport.envelope import decode, encode
from diffsplit.transport.worker_errors import BadRequest
from diffsplit.transport.worker_ops import (
    MAX_PRIORITY,
    Call,
    CallResult,
    Echo,
    NodeResult,
    RunFunction,
    RunNode,
    Timings,
    UploadChunk,
    simple_request,
)


def arrived(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` as the worker reads it: through the real envelope (tensors in their own frames)."""
    return decode(encode({**header, "request_id": "r1"}))


def test_run_node_round_trips_through_the_envelope() -> None:
    latent = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 4, 8, 8)
    inputs = {"seed": 3, "latent_image": {"samples": latent}}
    sent = RunNode(node_id="6", class_type="KSampler", inputs=inputs,
                   hold={"positive": "d" * 64}, uses_held=("e" * 64,), files=[{"folder": "embeddings"}],
                   deadline_s=30.0, priority=2, threads=4)
    got = RunNode.parse(arrived(sent.header()))
    assert (got.node_id, got.class_type) == ("6", "KSampler")
    assert (got.hold, got.uses_held) == (sent.hold, sent.uses_held)
    assert (got.files, got.deadline_s, got.priority, got.threads) == (sent.files, 30.0, 2, 4)
    assert torch.equal(got.inputs["latent_image"]["samples"], latent) and got.inputs["seed"] == 3


def test_run_node_defaults_leave_optional_fields_out() -> None:
    header = RunNode(node_id="1", class_type="VAEDecode", inputs={}).header()
    assert set(header) == {"op", "node", "inputs", "hold", "uses_held"}
    parsed = RunNode.parse(header)
    assert (parsed.files, parsed.deadline_s, parsed.priority, parsed.threads) == (None, None, 0, None)
    assert RunNode.parse({**header, "hold": ["positive"]}).hold == {"positive": ""}  # names alone are enough


@pytest.mark.parametrize(("change", "named"), [
    ({"node": "KSampler"}, "'node'"),
    ({"node": {"id": "1"}}, "'node'"),
    ({"inputs": [1, 2]}, "'inputs'"),
    ({"inputs": {1: "x"}}, "'inputs'"),
    ({"hold": {"positive": 1, 2: "x"}}, "'hold'"),
    ({"hold": "positive"}, "'hold'"),
    ({"uses_held": "abc"}, "'uses_held'"),
    ({"uses_held": [1]}, "'uses_held'"),
    ({"deadline_s": -1}, "'deadline_s'"),
    ({"deadline_s": float("nan")}, "'deadline_s'"),
    ({"deadline_s": True}, "'deadline_s'"),
    ({"deadline_s": "soon"}, "'deadline_s'"),
    ({"priority": MAX_PRIORITY + 1}, "'priority'"),
    ({"threads": 0}, "'threads'"),
    ({"threads": 2.0}, "'threads'"),
])
def test_a_malformed_run_node_names_its_field(change: dict[str, Any], named: str) -> None:
    header = {**RunNode(node_id="1", class_type="KSampler", inputs={"seed": 1}).header(), **change}
    with pytest.raises(BadRequest, match=named):
        RunNode.parse(header)


def test_call_and_run_function_round_trip_and_refuse_what_they_cannot_run() -> None:
    sent = Call(args=[1, torch.ones(3)], kwargs={"return_dict": False}, threads=2,
                target={"steps": []}, method="forward")
    got = Call.parse(arrived(sent.header()))
    assert (got.method, got.target, got.threads) == ("forward", {"steps": []}, 2)
    assert got.kwargs == {"return_dict": False}
    assert torch.equal(got.args[1], torch.ones(3))
    with pytest.raises(BadRequest, match="'method' in"):
        Call.parse({**sent.header(), "method": "__reduce__"})
    with pytest.raises(BadRequest, match="'args' must be a list"):
        Call.parse({**sent.header(), "args": {"a": 1}})
    with pytest.raises(BadRequest, match="keyed by argument names"):
        Call.parse({**sent.header(), "kwargs": {1: 2}})
    code = torch.frombuffer(bytearray(b"\x80\x05code"), dtype=torch.uint8)
    function = RunFunction.parse(arrived(RunFunction(args=[], kwargs={}, threads=None, code=code).header()))
    assert bytes(function.code.numpy()) == b"\x80\x05code" and function.threads is None
    for bad in (b"\x80\x05code", torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(3), None):
        with pytest.raises(BadRequest, match="pickled bytes"):
            RunFunction.parse({"op": "run_function", "function": bad})


def test_upload_chunks_keep_their_bytes_without_a_copy_and_name_bad_fields() -> None:
    data = bytearray(range(256)) * 4
    sent = UploadChunk(folder="loras", name="a.safetensors", sha256="AB" * 32, total_bytes=2048, offset=0,
                       data=data, final=False)
    got = UploadChunk.parse(arrived(sent.header()))
    assert bytes(got.data) == bytes(data) and got.sha256 == "ab" * 32 and got.target == "loras/a.safetensors"
    assert isinstance(got.data, memoryview)  # a view of the frame that arrived
    empty = UploadChunk.parse(arrived({**sent.header(), "data": b"", "final": True}))
    assert bytes(empty.data) == b"" and empty.final and not empty.content
    by_content = UploadChunk.parse(arrived({**sent.header(), "content": True}))
    assert by_content.content and "content" not in sent.header()
    for change, named in (({"offset": 1.5}, "'offset'"), ({"total_bytes": True}, "'total_bytes'"),
                          ({"name": 3}, "'name'"), ({"final": 1}, "'final'"), ({"data": [1, 2]}, "'data'"),
                          ({"content": "yes"}, "'content'")):
        with pytest.raises(BadRequest, match=named):
            UploadChunk.parse({**sent.header(), **change})


def test_replies_parse_what_the_worker_sends_and_tolerate_junk() -> None:
    timings = Timings(queue_s=0.5, rebuild_s=1.0, run_s=2.0, cache_hits=1, cache_misses=2)
    result = NodeResult(outputs=({"samples": torch.ones(1)}, 3), held=("d",), timings=timings)
    got = NodeResult.parse(arrived(result.header()), expected_outputs=2)
    assert got is not None and got.held == ("d",) and got.timings == timings
    assert NodeResult.parse(result.header(), expected_outputs=3) is None
    assert NodeResult.parse({"op": "result", "outputs": "x"}, expected_outputs=1) is None
    assert Timings.parse({"queue_s": "slow", "cache_hits": True}) == Timings()
    state = torch.Generator().manual_seed(1).get_state()
    call = CallResult.parse(arrived(CallResult(output=[1], generator_states=(state,)).header()))
    assert torch.equal(call.generator_states[0], state) and call.output == [1]
    assert CallResult.parse({"generator_states": [1, "x", torch.zeros(2)]}).generator_states == ()


def test_echo_and_the_ops_without_fields() -> None:
    assert Echo.parse(Echo(reply_bytes=10, data=b"x").header(), max_reply_bytes=10).reply_bytes == 10
    for size in (-1, 11, 2.0, True, "10"):
        with pytest.raises(BadRequest, match="reply_bytes"):
            Echo.parse({"op": "echo", "reply_bytes": size}, max_reply_bytes=10)
    assert simple_request("status") == {"op": "status"}
    with pytest.raises(ValueError, match="without fields"):
        simple_request("run_node")
