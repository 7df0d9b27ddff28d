"""The one nested-value walker: order, bounds, dataclasses, shared objects, deep values without recursion."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffsplit.engine.value_walk import DESCEND, iter_values, map_value


@dataclass(frozen=True)
class Hint:
    image: torch.Tensor
    strength: float


def test_parents_come_before_their_parts_in_order() -> None:
    value = {"a": [1, (2, 3)], "b": {"c": 4}}
    assert list(iter_values(value))[1:] == [[1, (2, 3)], 1, (2, 3), 2, 3, {"c": 4}, 4]


def test_dataclasses_only_when_asked_and_descend_keeps_contents_out() -> None:
    image = torch.zeros(2)
    value = [Hint(image, 0.5), {"skip": [image]}]
    assert sum(item is image for item in iter_values(value)) == 1, "the list's image; the hint is not opened"
    inside = list(iter_values(value, into_dataclasses=True))
    assert sum(item is image for item in inside) == 2
    assert any(item == 0.5 for item in inside if type(item) is float)
    kept_out = list(iter_values(value, into_dataclasses=True,
                                descend=lambda item: not (isinstance(item, dict) and "skip" in item)))
    assert sum(item is image for item in kept_out) == 1, "the hint's image, not the skipped list's"


def test_unique_visits_a_shared_object_once() -> None:
    shared = torch.ones(3)
    value = {"positive": [shared], "negative": [shared]}
    assert sum(item is shared for item in iter_values(value)) == 2
    assert sum(item is shared for item in iter_values(value, unique=True)) == 1


def test_bounds_stop_a_walk_of_hostile_data() -> None:
    deep: list = []
    for _ in range(50_000):  # far past Python's recursion limit
        deep = [deep]
    assert sum(1 for _ in iter_values(deep)) == 50_001
    assert sum(1 for _ in iter_values(deep, max_depth=10)) == 11
    assert sum(1 for _ in iter_values(list(range(1000)), max_values=100)) == 100


def test_map_value_still_rebuilds_only_what_changed() -> None:
    tensor = torch.zeros(1)
    value = {"latent": {"samples": tensor}, "steps": 4}
    same = map_value(value, lambda item: DESCEND)
    assert same is value
    doubled = map_value(value, lambda item: item * 2 if isinstance(item, torch.Tensor) else DESCEND)
    assert doubled is not value and doubled["steps"] == 4 and doubled["latent"]["samples"] is not tensor
