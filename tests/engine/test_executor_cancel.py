"""``Executor.run(cancel=...)``: a run stopped from another thread, as ``diffsplit batch`` stops its items."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.errors import Interrupted
from diffsplit.engine.executor import Executor, NodeCall, run_node_locally
from diffsplit.engine.graph import Link, Node, Workflow


def chain() -> Workflow:
    """1 MakeNumber → 2 Scale → 3 Format → 4 Show."""
    return Workflow.of(
        Node("1", "MakeNumber", {"seed": 5, "value": 2.5}),
        Node("2", "Scale", {"x": Link("1", 0), "factor": 3.0}),
        Node("3", "Format", {"x": Link("2", 0), "template": "{x}", "style": "plain"}),
        Node("4", "Show", {"text": Link("3", 0)}),
    )


def test_cancel_set_while_a_node_runs_stops_before_the_next_node(toy, tmp_path: Path) -> None:
    executor = Executor(toy.registry, None, inputs_dir=tmp_path / "in", output_dir=tmp_path / "out")
    cancel = threading.Event()
    ran: list[str] = []

    def runner(call: NodeCall) -> Any:
        ran.append(call.node.id)
        outputs = run_node_locally(call)
        if call.node.id == "2":
            cancel.set()  # as another thread would, while node 2 runs
        return outputs

    with pytest.raises(Interrupted):
        executor.run(chain(), node_runner=runner, cancel=cancel)
    assert ran == ["1", "2"], "nothing starts once the run is cancelled"


def test_a_run_given_an_unset_cancel_event_runs_to_the_end(toy, tmp_path: Path) -> None:
    executor = Executor(toy.registry, None, inputs_dir=tmp_path / "in", output_dir=tmp_path / "out")
    result = executor.run(chain(), cancel=threading.Event())
    assert result.executed == ("1", "2", "3", "4") and result.outputs["4"] == ("7.5",)


def test_cancel_reaches_a_running_node_at_its_next_progress_report(toy, tmp_path: Path) -> None:
    executor = Executor(toy.registry, None, inputs_dir=tmp_path / "in", output_dir=tmp_path / "out")
    cancel = threading.Event()
    seen: list[str] = []

    def runner(call: NodeCall) -> Any:
        seen.append(call.node.id)
        if call.node.id == "2":
            cancel.set()
            call.context.progress(1, 10)  # a sampler's step: raises Interrupted now
        return run_node_locally(call)

    with pytest.raises(Interrupted) as raised:
        executor.run(chain(), node_runner=runner, cancel=cancel)
    assert raised.value.node_id == "2" and seen == ["1", "2"]
