"""The executor: what runs, caching between runs, concurrency, failures, the node-runner seam, saving."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.errors import EngineError, NodeFailed, WorkflowError
from diffsplit.engine.execution_cache import ExecutionCache, node_signatures
from diffsplit.engine.executor import Executor, NodeCall, run_node_locally
from diffsplit.engine.formats import load_workflow, save_api_format
from diffsplit.engine.graph import Link, Node, Workflow
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.registry import default_registry
from diffsplit.engine.store import ModelStore
from PIL import Image

WAIT_S = 10.0


def chain(template: str = "{x}", factor: float = 3.0) -> Workflow:
    """1 MakeNumber → 2 Scale → 3 Format → 4 Show; 5 Scale hangs off 1 and is not needed."""
    return Workflow.of(
        Node("1", "MakeNumber", {"seed": 5, "value": 2.5}),
        Node("2", "Scale", {"x": Link("1", 0), "factor": factor}),
        Node("3", "Format", {"x": Link("2", 0), "template": template, "style": "plain"}),
        Node("4", "Show", {"text": Link("3", 0)}),
        Node("5", "Scale", {"x": Link("1", 0)}),
    )


def diamond() -> Workflow:
    """MakeNumber 1 → Scale 3 and Scale 4 → Add 5 → Format 7 → Show 8."""
    return Workflow.of(
        Node("1", "MakeNumber", {"seed": 5, "value": 2.5}),
        Node("3", "Scale", {"x": Link("1", 0), "factor": 3.0}),
        Node("4", "Scale", {"x": Link("1", 0), "factor": 3.0}),
        Node("5", "Add", {"a": Link("3", 0), "b": Link("4", 0)}),
        Node("7", "Format", {"x": Link("5", 0), "template": "{x}", "style": "plain"}),
        Node("8", "Show", {"text": Link("7", 0)}),
    )


@pytest.fixture
def executor(toy, tmp_path: Path) -> Executor:
    return Executor(toy.registry, None, inputs_dir=tmp_path / "in", output_dir=tmp_path / "out")


def test_runs_output_nodes_and_their_ancestors_only(toy, executor: Executor) -> None:
    result = executor.run(chain())
    assert result.executed == ("1", "2", "3", "4")
    assert result.outputs["4"] == ("7.5",)
    assert toy.calls["Scale"] == 1  # node 5 feeds no output node
    assert set(result.timings) == {"1", "2", "3", "4"}
    assert not any(timing.cache_hit for timing in result.timings.values())


def test_targets_choose_what_to_run(toy, executor: Executor) -> None:
    result = executor.run(chain(), targets=["5"])
    assert result.executed == ("1", "5") and result.outputs["5"] == (2.5,)
    with pytest.raises(WorkflowError, match="no output nodes"):
        executor.run(chain().restricted_to(["1", "2"]))


def test_invalid_workflow_fails_before_anything_runs(toy, executor: Executor) -> None:
    broken = chain().with_overrides({"2.factor": 50.0})
    with pytest.raises(WorkflowError, match=r"node 2 \(Scale\) input 'factor'"):
        executor.run(broken)
    assert sum(toy.calls.values()) == 0
    with pytest.raises(WorkflowError, match="unknown node class 'Nope'"):
        executor.run(chain().with_node(Node("9", "Nope", {})))


def test_ui_workflow_runs_end_to_end(toy, executor: Executor, make_ui) -> None:
    result = executor.run(load_workflow(make_ui(), toy.registry))
    assert result.outputs["8"] == ("15.0",)
    assert result.executed == ("1", "3", "4", "5", "7", "8")


def test_cache_reruns_only_what_depends_on_a_changed_widget(toy, executor: Executor) -> None:
    cache = ExecutionCache()
    first = executor.run(diamond(), cache=cache)
    assert toy.calls == {"MakeNumber": 1, "Scale": 2, "Add": 1, "Format": 1, "Show": 1}

    toy.calls.clear()
    again = executor.run(diamond(), cache=cache)
    assert toy.calls == {"Show": 1}  # output nodes always run
    assert again.executed == ("8",)
    assert again.outputs == {
        "7": first.outputs["7"],
        "8": first.outputs["8"],
    }  # hits' ancestors are not needed
    assert [node_id for node_id, t in again.timings.items() if t.cache_hit] == ["7"]

    toy.calls.clear()
    changed = executor.run(diamond().with_overrides({"3.factor": 1.0}), cache=cache)
    assert toy.calls == {"Scale": 1, "Add": 1, "Format": 1, "Show": 1}
    assert changed.executed == ("3", "5", "7", "8")
    assert changed.outputs["8"] == ("10.0",)
    assert changed.timings["1"].cache_hit and changed.timings["4"].cache_hit


def test_without_a_cache_everything_reruns(toy, executor: Executor) -> None:
    executor.run(diamond())
    executor.run(diamond())
    assert toy.calls["MakeNumber"] == 2 and toy.calls["Scale"] == 4


def test_signatures_follow_ancestors_not_node_ids() -> None:
    workflow = diamond()
    signatures = node_signatures(workflow, workflow.topological_order())
    assert signatures["3"] == signatures["4"]  # same class, same literals, same source
    changed = workflow.with_overrides({"1.value": 1.0})
    changed_signatures = node_signatures(changed, changed.topological_order())
    assert all(changed_signatures[node_id] != signatures[node_id] for node_id in workflow.nodes)
    assert node_signatures(workflow, workflow.topological_order(), uncacheable=["1"])["8"] is None


def test_cache_is_bounded_when_asked() -> None:
    cache = ExecutionCache(max_entries=2)
    for key in "abc":
        cache.put(key, (key,))
    assert len(cache) == 2 and "a" not in cache and cache.get("c") == ("c",)


# -- concurrency and failures ---------------------------------------------------------------------


def rendezvous_nodes(
    events: dict[str, threading.Event], seen: dict[str, bool], wait_s: float = WAIT_S
) -> tuple[NodeClass, ...]:
    """Two nodes that each signal, then wait for the other: both see the other only if both run at once."""

    def meet(ctx: NodeContext, *, me: str, other: str) -> tuple[str]:
        events[me].set()
        seen[me] = events[other].wait(wait_s)
        return (me,)

    def join(ctx: NodeContext, *, a: str, b: str) -> tuple[str]:
        return (a + b,)

    return (
        NodeClass(
            "Meet",
            (InputSpec("me", "STRING"), InputSpec("other", "STRING")),
            (OutputSpec("STRING", "STRING"),),
            meet,
        ),
        NodeClass(
            "Join",
            (InputSpec("a", "STRING"), InputSpec("b", "STRING")),
            (OutputSpec("STRING", "STRING"),),
            join,
            output_node=True,
        ),
    )


def rendezvous_workflow() -> Workflow:
    return Workflow.of(
        Node("1", "Meet", {"me": "a", "other": "b"}),
        Node("2", "Meet", {"me": "b", "other": "a"}),
        Node("3", "Join", {"a": Link("1", 0), "b": Link("2", 0)}),
    )


def test_independent_branches_run_concurrently(toy, tmp_path: Path) -> None:
    events = {"a": threading.Event(), "b": threading.Event()}
    seen: dict[str, bool] = {}
    registry = toy.registry.with_nodes(rendezvous_nodes(events, seen))
    result = Executor(registry, None, output_dir=tmp_path, max_workers=2).run(rendezvous_workflow())
    assert seen == {"a": True, "b": True}
    assert result.outputs["3"] == ("ab",)


def test_one_worker_runs_nodes_one_at_a_time(toy, tmp_path: Path) -> None:
    events = {"a": threading.Event(), "b": threading.Event()}
    seen: dict[str, bool] = {}
    registry = toy.registry.with_nodes(rendezvous_nodes(events, seen, wait_s=0.2))
    result = Executor(registry, None, output_dir=tmp_path, max_workers=1).run(rendezvous_workflow())
    assert seen == {"a": False, "b": True}  # node 2 could not start before node 1 had finished
    assert result.executed == ("1", "2", "3") and result.outputs["3"] == ("ab",)


def test_node_failure_is_wrapped_and_running_branches_finish(toy, tmp_path: Path) -> None:
    started = threading.Event()
    finished: list[str] = []

    def explode(ctx: NodeContext, *, me: str, other: str) -> tuple[str]:
        started.set()
        raise ValueError("the flux capacitor is empty")

    def slow(ctx: NodeContext, *, me: str, other: str) -> tuple[str]:
        started.wait(WAIT_S)
        finished.append(me)
        return (me,)

    spec = (InputSpec("me", "STRING"), InputSpec("other", "STRING"))
    out = (OutputSpec("STRING", "STRING"),)
    registry = toy.registry.with_nodes(
        rendezvous_nodes({}, {})[1:],
        (NodeClass("Explode", spec, out, explode), NodeClass("Meet", spec, out, slow)),
    )
    workflow = Workflow.of(
        Node("1", "Explode", {"me": "a", "other": "b"}),
        Node("2", "Meet", {"me": "b", "other": "a"}),
        Node("3", "Join", {"a": Link("1", 0), "b": Link("2", 0)}),
        Node("4", "Show", {"text": Link("2", 0)}),
    )
    with pytest.raises(NodeFailed) as caught:
        Executor(registry, None, output_dir=tmp_path, max_workers=2).run(workflow)
    error = caught.value
    assert (error.node_id, error.class_type) == ("1", "Explode")
    assert str(error) == "node 1 (Explode) failed: ValueError: the flux capacitor is empty"
    assert isinstance(error.__cause__, ValueError)
    assert finished == ["b"]
    assert toy.calls["Show"] == 0  # nothing new starts after a failure


def test_wrong_number_of_outputs_is_a_node_failure(toy, tmp_path: Path) -> None:
    broken = NodeClass("Broken", (), (OutputSpec("NUMBER", "NUMBER"),), lambda ctx: (1.0, 2.0))
    registry = toy.registry.with_nodes(broken)
    workflow = Workflow.of(Node("1", "Broken", {}), Node("2", "Scale", {"x": Link("1", 0)}))
    with pytest.raises(
        NodeFailed, match=r"node 1 \(Broken\) failed: returned 2 value\(s\); expected a tuple of 1"
    ):
        Executor(registry, None, output_dir=tmp_path).run(workflow, targets=["2"])


# -- the node-runner seam and supplied outputs ----------------------------------------------------


def test_node_runner_can_take_over_labelled_nodes(toy, executor: Executor) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def runner(call: NodeCall) -> tuple[Any, ...]:
        if call.node.remote:
            sent.append((call.node.id, dict(call.inputs)))
            return (f"remote:{call.inputs['x']}",)
        return tuple(run_node_locally(call))

    workflow = chain().with_node(chain().node("3").with_meta(remote="tcp://gpu:5555"))
    result = executor.run(workflow, node_runner=runner)
    assert sent == [("3", {"x": 7.5, "template": "{x}", "style": "plain"})]
    assert result.outputs["4"] == ("remote:7.5",)
    assert toy.calls["Format"] == 0


def test_given_outputs_replace_upstream_nodes(toy, executor: Executor) -> None:
    sub = chain().restricted_to(["1", "2", "3"])
    result = executor.run(sub, targets=["3"], given={"1": (10.0,)})
    assert result.outputs["3"] == ("30.0",)
    assert result.executed == ("2", "3") and toy.calls["MakeNumber"] == 0
    with pytest.raises(WorkflowError, match="given 2 output value"):
        executor.run(sub, targets=["3"], given={"1": (1.0, 2.0)})


# -- context: progress, files, images -------------------------------------------------------------


def context_nodes(progress_log: list[int]) -> tuple[NodeClass, ...]:
    def count(ctx: NodeContext, *, steps: int) -> tuple[float]:
        for step in range(1, steps + 1):
            ctx.progress(step, steps)
        return (float(steps),)

    def read_text(ctx: NodeContext, *, name: str) -> tuple[str]:
        return (ctx.input_path(name).read_text(),)

    def save_solid(ctx: NodeContext, *, text: str, prefix: str, temporary: bool) -> tuple[()]:
        ctx.save_image(Image.new("RGB", (4, 4), (len(text), 0, 0)), prefix, temporary=temporary)
        return ()

    return (
        NodeClass("Count", (InputSpec("steps", "INT"),), (OutputSpec("NUMBER", "NUMBER"),), count),
        NodeClass("ReadText", (InputSpec("name", "STRING"),), (OutputSpec("STRING", "STRING"),), read_text),
        NodeClass(
            "SaveSolid",
            (InputSpec("text", "STRING"), InputSpec("prefix", "STRING"), InputSpec("temporary", "BOOLEAN")),
            (),
            save_solid,
            output_node=True,
        ),
    )


def test_progress_is_forwarded_with_the_node_id(toy, tmp_path: Path) -> None:
    reports: list[tuple[str, int, int]] = []
    registry = toy.registry.with_nodes(context_nodes([]))
    executor = Executor(registry, None, output_dir=tmp_path, progress=lambda *report: reports.append(report))
    executor.run(Workflow.of(Node("6", "Count", {"steps": 3})), targets=["6"])
    assert reports == [("6", 1, 3), ("6", 2, 3), ("6", 3, 3)]


def test_input_files_stay_inside_the_inputs_folder(toy, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "note.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("secret")
    registry = toy.registry.with_nodes(context_nodes([]))
    executor = Executor(registry, None, inputs_dir=inputs, output_dir=tmp_path / "out")
    read = Workflow.of(Node("1", "ReadText", {"name": "note.txt"}))
    assert executor.run(read, targets=["1"]).outputs["1"] == ("hello",)
    for name, fragment in (
        ("../secret.txt", "'..'"),
        ("/etc/passwd", "absolute"),
        ("nope.txt", "available: note.txt"),
    ):
        with pytest.raises(NodeFailed, match=fragment) as caught:
            executor.run(read.with_overrides({"1.name": name}), targets=["1"])
        assert isinstance(caught.value.__cause__, EngineError)


def test_model_paths_come_from_the_store(toy, tmp_path: Path, tiny_store_root: Path) -> None:
    executor = Executor(toy.registry, ModelStore(tiny_store_root), output_dir=tmp_path)
    workflow = Workflow.of(Node("1", "LoadModel", {"ckpt_name": "sd/v15.ckpt"}))
    assert executor.run(workflow, targets=["1"]).outputs["1"] == ("v15 weights",)
    with pytest.raises(WorkflowError, match=r'ckpt_name "gone\.ckpt" not found in checkpoints/'):
        executor.run(workflow.with_overrides({"1.ckpt_name": "gone.ckpt"}), targets=["1"])


def test_saved_images_count_up_and_carry_the_workflow(toy, tmp_path: Path) -> None:
    registry = toy.registry.with_nodes(context_nodes([]))
    out = tmp_path / "out"
    executor = Executor(registry, None, output_dir=out)
    workflow = chain().with_node(
        Node("9", "SaveSolid", {"text": Link("3", 0), "prefix": "shots/solid", "temporary": False})
    )
    first = executor.run(workflow, cache=ExecutionCache())
    second = executor.run(workflow)
    assert first.saved_files == (out / "shots" / "solid_00001_.png",)
    assert second.saved_files == (out / "shots" / "solid_00002_.png",)
    with Image.open(first.saved_files[0]) as image:
        assert json.loads(image.text["prompt"]) == save_api_format(workflow)
        assert "workflow" not in image.text
    reloaded = load_workflow(first.saved_files[0], registry)
    assert reloaded.nodes == workflow.nodes

    temporary = executor.run(workflow.with_overrides({"9.temporary": True}))
    assert temporary.saved_files == (out / "temp" / "shots" / "solid_00001_.png",)
    with pytest.raises(NodeFailed, match=r"prefix '\.\./escape'"):
        executor.run(workflow.with_overrides({"9.prefix": "../escape"}))


def test_saved_images_embed_the_ui_form_when_known(toy, tmp_path: Path, make_ui) -> None:
    registry = toy.registry.with_nodes(context_nodes([]))
    document = make_ui()
    document["nodes"].append(
        {
            "id": 20,
            "type": "SaveSolid",
            "mode": 0,
            "inputs": [{"name": "text", "type": "STRING", "link": 13, "widget": {"name": "text"}}],
            "outputs": [],
            "widgets_values": ["", "solid", False],
            "properties": {},
        }
    )
    document["links"].append([13, 7, 0, 20, 0, "STRING"])
    result = Executor(registry, None, output_dir=tmp_path).run(load_workflow(document, registry))
    (saved,) = result.saved_files
    assert saved.name == "solid_00001_.png"
    with Image.open(saved) as image:
        assert json.loads(image.text["workflow"]) == document
    assert load_workflow(saved, registry).extra["workflow"] == document


# -- the real node library --------------------------------------------------------------------------


def test_stock_comfyui_default_graph_runs_on_tiny_models(models_dir: Path, tmp_path: Path, stock_ui) -> None:
    registry = default_registry()
    store = ModelStore(models_dir)
    workflow = load_workflow(stock_ui("tiny-sd15.safetensors"), registry)
    assert workflow.node("3").inputs["seed"] == 156680208700286 and workflow.node("3").inputs["steps"] == 2
    workflow.validate(registry, store)
    with pytest.raises(WorkflowError, match=r'ckpt_name "absent\.safetensors" not found in checkpoints/'):
        workflow.with_overrides({"4.ckpt_name": "absent.safetensors"}).validate(registry, store)

    executor = Executor(registry, store, output_dir=tmp_path, max_workers=2)
    cache = ExecutionCache()
    first = executor.run(workflow, cache=cache)
    assert first.executed == ("4", "5", "6", "7", "3", "8", "9")
    assert [path.name for path in first.saved_files] == ["ComfyUI_00001_.png"]
    again = executor.run(workflow.with_overrides({"3.cfg": 7.0}), cache=cache)
    assert again.executed == ("3", "8", "9")
    assert load_workflow(again.saved_files[0], registry).node("3").inputs["cfg"] == 7.0
