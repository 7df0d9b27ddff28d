"""Conditioning edit nodes in real runs: what must change the image and what must not."""

from __future__ import annotations

from typing import Any

import torch
from diffsplit.engine.example_workflows import sd15_workflow


def _with_edit(edit: dict[str, Any]) -> dict[str, Any]:
    workflow = sd15_workflow(lora=False, steps=3)
    inputs = {"conditioning": ["3", 0]} if "conditioning_to" not in edit else {}
    workflow["20"] = {"class_type": edit.pop("class_type"), "inputs": {**inputs, **edit}}
    workflow["6"]["inputs"]["positive"] = ["20", 0]
    return workflow


def test_a_full_timestep_range_changes_nothing_and_a_half_range_does(run_workflow) -> None:
    plain = run_workflow(sd15_workflow(lora=False, steps=3)).outputs["6"][0]["samples"]
    full = run_workflow(_with_edit({"class_type": "ConditioningSetTimestepRange", "start": 0.0, "end": 1.0}))
    assert torch.equal(full.outputs["6"][0]["samples"], plain)
    half = run_workflow(_with_edit({"class_type": "ConditioningSetTimestepRange", "start": 0.5, "end": 1.0}))
    assert not torch.equal(half.outputs["6"][0]["samples"], plain)


def test_average_with_itself_and_concat_change_what_they_should(run_workflow) -> None:
    plain = run_workflow(sd15_workflow(lora=False, steps=3)).outputs["6"][0]["samples"]
    same = run_workflow(_with_edit({"class_type": "ConditioningAverage", "conditioning_to": ["3", 0],
                                    "conditioning_from": ["3", 0], "conditioning_to_strength": 0.4}))
    assert torch.allclose(same.outputs["6"][0]["samples"], plain, rtol=1e-4, atol=1e-3)  # float rounding only
    mixed = run_workflow(_with_edit({"class_type": "ConditioningAverage", "conditioning_to": ["3", 0],
                                     "conditioning_from": ["4", 0], "conditioning_to_strength": 0.4}))
    assert not torch.allclose(mixed.outputs["6"][0]["samples"], plain, atol=0.1)
    joined = run_workflow(_with_edit({"class_type": "ConditioningConcat", "conditioning_to": ["3", 0],
                                      "conditioning_from": ["4", 0]}))
    assert not torch.allclose(joined.outputs["6"][0]["samples"], plain, atol=0.1)
