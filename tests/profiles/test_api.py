"""``profile(fn)`` for decorated Python code: @node and @loader calls become steps."""

from __future__ import annotations

import sys

import torch
from diffsplit.profiles.api import profile

from diffsplit.decorators import loader, node


@loader
def build_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())


@node
def denoise(model: torch.nn.Module, latents: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        latents = model(latents)
    return latents


@node
def decode(latents: torch.Tensor) -> torch.Tensor:
    return latents.clamp(-1, 1)


def generate(width: int) -> torch.Tensor:
    model = build_model(width)
    latents = torch.randn(4, width)
    for _ in range(2):
        latents = denoise(model, latents, 3)
    return decode(latents)


def test_marked_steps_are_measured_and_counted() -> None:
    result = profile(generate, 32)
    assert result.hooked
    assert result.result.shape == (4, 32), "the function's own result is kept"
    steps = {step.name: step for step in result.steps}
    assert list(steps) == ["build_model", "denoise", "decode"]
    assert steps["build_model"].kind == "loader" and steps["build_model"].calls == 1
    assert steps["denoise"].kind == "node" and steps["denoise"].calls == 2
    assert steps["denoise"].input_bytes["intermediate"] == 2 * 4 * 32 * 4, "two calls with a [4, 32] float32"
    linear = 32 * 32 * 4 + 32 * 4
    assert steps["denoise"].naive_weight_bytes == linear, "the model a naive design would ship"
    assert steps["decode"].naive_weight_bytes == 0
    assert all(step.wall_s >= 0 and step.peak_bytes > 0 for step in result.steps)
    assert result.total_s >= sum(step.wall_s for step in result.steps)
    assert "denoise" in result.report()


def test_unmarked_code_is_one_step_and_the_profile_hook_is_restored() -> None:
    before = sys.getprofile()
    result = profile(sum, [1, 2, 3])
    assert sys.getprofile() is before
    assert result.result == 6
    assert not result.hooked
    assert [(step.name, step.kind, step.calls) for step in result.steps] == [("sum", "call", 1)]
    assert "the whole call is one step" in result.report()
