"""``LockstepGroup(pass_threads=N)``: the shared passes run on the group's own thread with N threads.

Members then sample on one intra-op thread each (the worker's batches), and one
OpenMP team does the UNet passes instead of one team per member thread.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from diffsplit.engine.sampling.lockstep import LockstepGroup, sample_batched
from diffsplit.engine.types import DiffusionModel

from .test_lockstep_batching import ATOL, STEPS, _alone, _max_diff, _requests
from .test_lockstep_batching import model as model  # the tiny SD 1.5 MODEL fixture


def _joined(thread: threading.Thread) -> bool:
    thread.join(30)  # the pool's worker exits once the group shut it down
    return thread.is_alive()


def test_shared_passes_run_on_the_groups_thread_with_its_thread_count(model: DiffusionModel) -> None:
    seen: list[tuple[str, int]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    requests = _requests(model, "euler")
    handle = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        group = LockstepGroup(len(requests), pass_threads=2)
        outcomes = sample_batched(requests, group=group)
    finally:
        handle.remove()
    assert len(seen) == STEPS, seen  # one shared pass per step
    assert {name.startswith("diffsplit-lockstep") for name, _ in seen} == {True}
    assert {threads for _, threads in seen} == {2}
    assert not [t for t in threading.enumerate() if t.name.startswith("diffsplit-lockstep")
                and t.is_alive() and t.ident is not None and _joined(t)], "let go once every member left"
    for request, outcome in zip(requests, outcomes, strict=True):
        assert _max_diff(outcome.result()["samples"], _alone(request)) < ATOL
