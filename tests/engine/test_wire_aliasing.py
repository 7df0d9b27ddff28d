"""The wire keeps aliasing: a value referenced twice in one request comes back as one object."""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.types import ControlHint, ControlNet
from diffsplit.engine.wire_values import HintTable, from_wire, to_wire
from diffsplit.transport.envelope import decode, encode

RECIPE = {"v": 1, "steps": [], "select": "", "fingerprint": "f"}


def _hint(strength: float = 0.7, previous: ControlHint | None = None) -> ControlHint:
    generator = torch.Generator().manual_seed(int(strength * 100))
    image = torch.rand((1, 8, 8, 3), generator=generator)
    return ControlHint(ControlNet(model=torch.nn.Identity()), image, strength, previous=previous)


def _conditioning(hint: ControlHint, seed: int) -> list[list[Any]]:
    cond = torch.randn((1, 4, 8), generator=torch.Generator().manual_seed(seed))
    return [[cond, {"control": hint}]]


def _round_trip(values: dict[str, Any], hints: HintTable | None = None) -> dict[str, Any]:
    """to_wire, through a real envelope (frames and all), then from_wire like the worker does."""
    wire = {name: to_wire(value, lambda _model: RECIPE, where=name) for name, value in values.items()}
    frames = encode({"inputs": wire})
    received = decode(frames)["inputs"]
    built: list[dict[str, Any]] = []

    def build(recipe: dict[str, Any]) -> ControlNet:
        built.append(recipe)
        return ControlNet(model=torch.nn.Identity())

    table = hints if hints is not None else HintTable()
    return {name: from_wire(value, build, hints=table) for name, value in received.items()}


def test_one_hint_in_positive_and_negative_comes_back_as_one_object() -> None:
    shared = _hint()
    out = _round_trip({"positive": _conditioning(shared, 1), "negative": _conditioning(shared, 2)})
    positive_hint = out["positive"][0][1]["control"]
    negative_hint = out["negative"][0][1]["control"]
    assert positive_hint is negative_hint
    assert torch.equal(positive_hint.image, shared.image)


def test_chained_hints_share_their_previous_hint() -> None:
    first = _hint(0.4)
    second = _hint(0.9, previous=first)
    out = _round_trip({"positive": _conditioning(second, 1), "negative": _conditioning(second, 2)})
    positive_hint = out["positive"][0][1]["control"]
    negative_hint = out["negative"][0][1]["control"]
    assert positive_hint is negative_hint
    assert positive_hint.previous is not None and positive_hint.previous.strength == 0.4


def test_different_hints_stay_different_objects() -> None:
    out = _round_trip({"positive": _conditioning(_hint(0.4), 1), "negative": _conditioning(_hint(0.5), 2)})
    assert out["positive"][0][1]["control"] is not out["negative"][0][1]["control"]


def test_a_table_shared_across_requests_finds_the_hint_again() -> None:
    shared = _hint()
    table = HintTable()
    first = _round_trip({"positive": _conditioning(shared, 1)}, table)
    second = _round_trip({"negative": _conditioning(shared, 2)}, table)
    assert first["positive"][0][1]["control"] is second["negative"][0][1]["control"]
    assert len(table) == 1


def test_one_tensor_used_by_two_inputs_travels_once_and_is_one_object() -> None:
    tensor = torch.randn((1, 4, 64, 64))  # 64 KiB: rides as its own frame
    wire = {name: to_wire(tensor, lambda _m: None, where=name) for name in ("a", "b")}
    frames = encode({"inputs": wire})
    assert len(frames) == 4  # magic, version, header and one tensor frame
    received = decode(frames)["inputs"]
    assert received["a"] is received["b"]
    assert torch.equal(received["a"], tensor)


def _at_odd_address(part: Any, offset: int) -> memoryview:
    """A writable copy of a frame that starts ``offset`` bytes past a 64-byte boundary."""
    data = bytes(part)
    raw = torch.empty(len(data) + 128, dtype=torch.uint8)
    start = (-raw.data_ptr() % 64) + offset
    view = memoryview(raw.numpy())[start : start + len(data)]
    view[:] = data
    return view


def test_received_tensors_sit_at_aligned_addresses_wherever_the_frames_arrived() -> None:
    for offset in (0, 4, 36, 52):
        for shape in [(3,), (1, 4, 8, 8), (1, 4, 64, 64), (7, 5)]:
            tensor = torch.randn(shape)
            parts = [_at_odd_address(part, offset) for part in encode({"t": tensor})]
            received = decode(parts)["t"]
            assert received.data_ptr() % 64 == 0, (offset, shape)
            assert torch.equal(received, tensor)
