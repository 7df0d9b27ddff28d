"""Provenance for ComfyUI graphs: every node's inputs by category, and a recipe per model input.

``trace_workflow(workflow, registry, store)`` runs the workflow once (through
the executor's ``node_runner`` seam) and records every loader node's call
(``is_loader``: CheckpointLoaderSimple, LoraLoader, VAELoader,
CLIPSetLastLayer, ControlNetLoader...) as a provenance root. Each node's model
inputs are then explained by object identity, like diffusers objects in a
Python trace: ``KSampler.model ← LoraLoader(…) ← CheckpointLoaderSimple(…)``,
with a recipe whose steps are loader nodes and whose files are named by the
store. Models inside intermediate inputs (the ControlNet in a control hint)
get recipes too, and in-place edits of loaded weights are refused.

With ``execute=False`` nothing runs: categories come from the declared types
and recipes from the graph's links (no fingerprints, no embedded models).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.executor import Executor, NodeCall, run_node_locally
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.graph import Link, Workflow
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import (
    INTERMEDIATE_TYPES,
    MODEL_TYPES,
    NORMAL_TYPES,
    ClipVision,
    ControlNet,
    DiffusionModel,
    TextEncoders,
    Vae,
)
from diffsplit.tracer.calls import CallRecord, LocalFile, capture_argument_states
from diffsplit.tracer.errors import NotOffloadable
from diffsplit.tracer.files import file_refs_for
from diffsplit.tracer.inputs import Explained, InputExplanation, ModuleUse, explain_input, with_used_parts
from diffsplit.tracer.recipe import Recipe, Step, file_value, recipe_value
from diffsplit.tracer.report import input_lines
from diffsplit.tracer.session import Session

#: The engine's model classes, for input categories.
ENGINE_MODEL_TYPES: tuple[type, ...] = (DiffusionModel, TextEncoders, Vae, ControlNet, ClipVision)
#: Makes the executor for a traced run.
ExecutorFactory = Callable[[], Executor]


@dataclass(frozen=True)
class NodeTrace:
    """One node of a traced workflow: its inputs explained, and whether it ran."""

    node_id: str
    class_type: str
    title: str
    remote: str | None
    is_loader: bool
    inputs: tuple[InputExplanation, ...]
    ran: bool

    def input(self, name: str) -> InputExplanation:
        """The explanation of input ``name``; KeyError if the node has no such input."""
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(f"node {self.node_id} ({self.class_type}) has no input {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "id": self.node_id,
            "class_type": self.class_type,
            "title": self.title,
            "remote": self.remote,
            "is_loader": self.is_loader,
            "ran": self.ran,
            "inputs": [item.to_dict() for item in self.inputs],
        }


@dataclass(frozen=True)
class WorkflowTrace:
    """Every node of a workflow, in topological order, with its inputs explained."""

    nodes: tuple[NodeTrace, ...]
    executed: bool

    def node(self, node_id: str) -> NodeTrace:
        """The trace of node ``node_id``."""
        for item in self.nodes:
            if item.node_id == node_id:
                return item
        raise KeyError(f"no node {node_id!r} in the trace")

    def recipes(self) -> dict[str, Recipe]:
        """``{"NODE.INPUT": recipe}`` for every explained model input."""
        found = {}
        for item in self.nodes:
            for explained in item.inputs:
                if explained.model is not None and explained.model.recipe is not None:
                    found[f"{item.node_id}.{explained.name}"] = explained.model.recipe
        return found

    def refusals(self) -> dict[str, NotOffloadable]:
        """``{"NODE.INPUT[.path]": refusal}`` for every model that cannot be offloaded."""
        found = {}
        for item in self.nodes:
            for explained in item.inputs:
                models = ([explained.model] if explained.model else []) + list(explained.embedded)
                for model in models:
                    if model.refusal is not None:
                        key = f"{item.node_id}.{explained.name}" + (f".{model.path}" if model.path else "")
                        found[key] = model.refusal
        return found

    def report_text(self) -> str:
        """Per node: each input's category and, for models, the chain of loaders behind it."""
        mode = "executed" if self.executed else "dry (nothing ran)"
        lines = [f"workflow trace, {mode}: {len(self.nodes)} node(s)"]
        for item in self.nodes:
            flags = " [loader]" if item.is_loader else ""
            flags += f" → remote {item.remote}" if item.remote else ""
            flags += "" if item.ran or not self.executed else " (not run)"
            lines.append(f"{item.node_id} {item.class_type} {item.title!r}{flags}")
            lines.extend(
                f"    {line}" for explained in item.inputs for line in input_lines(item.class_type, explained)
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {"executed": self.executed, "nodes": [item.to_dict() for item in self.nodes]}


def _loader_record(session: Session, node_class: NodeClass, call: NodeCall) -> CallRecord:
    """A loader node's call, with its model-file inputs as local files."""
    kwargs: dict[str, Any] = {}
    for name, value in call.inputs.items():
        spec = node_class.input(name)
        if spec is not None and spec.model_folder and isinstance(value, str):
            kwargs[name] = LocalFile(call.context.model_path(spec.model_folder, value))
        else:
            kwargs[name] = value
    return CallRecord(
        index=session.next_index(),
        op="comfy.node",
        kind="loader",
        label=node_class.name,
        cls=node_class.name,
        kwargs=kwargs,
        argument_states=capture_argument_states(call.inputs.values()),
    )


class _TracingRunner:
    """The executor's node runner during a traced run."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.nodes: dict[str, NodeTrace] = {}

    def __call__(self, call: NodeCall) -> Sequence[Any]:
        node, node_class = call.node, call.node_class
        where = node_class.name
        inputs = tuple(
            explain_input(name, value, self.session.make_recipe, where=where, model_types=ENGINE_MODEL_TYPES)
            for name, value in call.inputs.items()
        )
        record = _loader_record(self.session, node_class, call) if node_class.is_loader else None
        with ModuleUse() as use:
            outputs = run_node_locally(call)
        if record is not None:
            self.session.record_call(record, None, tuple(outputs))
        inputs = tuple(with_used_parts(item, call.inputs[item.name], use.called) for item in inputs)
        self.nodes[node.id] = NodeTrace(
            node.id, node.class_type, node.title, node.remote, node_class.is_loader, inputs, ran=True
        )
        return outputs


def _executed_trace(
    workflow: Workflow,
    registry: NodeRegistry,
    store: ModelStore | None,
    factory: ExecutorFactory | None,
    inputs_dir: Path | None,
) -> WorkflowTrace:
    session = Session(file_refs_for(store), model_types=ENGINE_MODEL_TYPES)
    runner = _TracingRunner(session)
    with tempfile.TemporaryDirectory(prefix="diffsplit-trace-") as scratch:
        executor = (
            factory()
            if factory is not None
            else Executor(registry, store, inputs_dir=inputs_dir, output_dir=Path(scratch))
        )
        executor.run(workflow, node_runner=runner)
    nodes = []
    for node_id in workflow.topological_order():
        traced = runner.nodes.get(node_id)
        if traced is None:
            node = workflow.node(node_id)
            node_class = registry.get(node.class_type)
            traced = NodeTrace(
                node.id, node.class_type, node.title, node.remote, node_class.is_loader, (), False
            )
        nodes.append(traced)
    return WorkflowTrace(tuple(nodes), executed=True)


class _StaticRecipes:
    """Recipes read from the graph's links alone (a dry trace)."""

    def __init__(self, workflow: Workflow, registry: NodeRegistry, store: ModelStore | None) -> None:
        self.workflow = workflow
        self.registry = registry
        self.store = store
        self.files = file_refs_for(store)

    def recipe(self, link: Link, label: str) -> Recipe:
        source = self.workflow.node(link.node_id)
        node_class = self.registry.get(source.class_type)
        if not node_class.is_loader:
            raise NotOffloadable(
                label, f"it comes from node {source.id} ({source.class_type}), which is not a loader node"
            )
        kwargs: dict[str, Any] = {}
        for name, value in source.inputs.items():
            spec = node_class.input(name)
            if isinstance(value, Link):
                kwargs[name] = recipe_value(self.recipe(value, f"{source.class_type}.{name}"))
            elif spec is not None and spec.model_folder and isinstance(value, str):
                if self.store is None:
                    raise NotOffloadable(label, f"no model store to find {spec.model_folder}/{value} in")
                kwargs[name] = file_value(self.files.file_ref(self.store.resolve(spec.model_folder, value)))
            else:
                kwargs[name] = value
        step = Step(op="comfy.node", cls=source.class_type, kwargs=kwargs)
        return Recipe(steps=(step,), select=str(link.output_index))

    def explain(self, node_class: NodeClass, name: str, value: Any) -> InputExplanation:
        if not isinstance(value, Link):
            return InputExplanation(name, type(value).__name__, "normal")
        source = self.workflow.node(value.node_id)
        outputs = self.registry.get(source.class_type).outputs
        type_name = outputs[value.output_index].type if value.output_index < len(outputs) else "?"
        if type_name in MODEL_TYPES:
            label = f"{node_class.name}.{name}"
            try:
                model = Explained("", type_name, recipe=self.recipe(value, label))
            except NotOffloadable as refusal:
                model = Explained("", type_name, refusal=refusal)
            return InputExplanation(name, type_name, "model", model=model)
        if type_name in INTERMEDIATE_TYPES:
            return InputExplanation(name, type_name, "intermediate")
        if type_name in NORMAL_TYPES:
            return InputExplanation(name, type_name, "normal")
        return InputExplanation(
            name, type_name, None, error=f"input '{name}' has the unknown type {type_name}"
        )


def _dry_trace(workflow: Workflow, registry: NodeRegistry, store: ModelStore | None) -> WorkflowTrace:
    static = _StaticRecipes(workflow, registry, store)
    nodes = []
    for node_id in workflow.topological_order():
        node = workflow.node(node_id)
        node_class = registry.get(node.class_type)
        inputs = tuple(static.explain(node_class, name, value) for name, value in node.inputs.items())
        nodes.append(
            NodeTrace(node.id, node.class_type, node.title, node.remote, node_class.is_loader, inputs, False)
        )
    return WorkflowTrace(tuple(nodes), executed=False)


def trace_workflow(
    workflow: Workflow | str | Path | Mapping[str, Any],
    registry: NodeRegistry,
    store: ModelStore | None,
    *,
    execute: bool = True,
    executor_factory: ExecutorFactory | None = None,
    inputs_dir: Path | None = None,
) -> WorkflowTrace:
    """Trace a ComfyUI workflow (a Workflow, a file, or a parsed document).

    ``execute=True`` runs it once (LoadImage reads from ``inputs_dir``; output
    images go to a temporary folder unless ``executor_factory`` makes an
    executor of its own) and explains every input from the objects seen;
    ``execute=False`` explains from the graph alone. Raises WorkflowError for
    an invalid workflow and NodeFailed when a node fails while running.
    """
    if not isinstance(workflow, Workflow):
        workflow = load_workflow(workflow, registry)
    for node in workflow.nodes.values():
        if node.class_type not in registry:
            raise WorkflowError(registry.unknown_class_message(node.class_type), node_id=node.id)
    if execute:
        return _executed_trace(workflow, registry, store, executor_factory, inputs_dir)
    return _dry_trace(workflow, registry, store)


def output_recipe_source(
    workflow: Workflow, registry: NodeRegistry, store: ModelStore | None
) -> Callable[[str, int], dict[str, Any] | None]:
    """For ``engine.offload.RemoteRunner``: the recipe (plain data) of a loader node's output.

    Returns None where the graph alone cannot explain the output (the runner
    then refuses to send any input holding it).
    """
    static = _StaticRecipes(workflow, registry, store)

    def recipe_for(node_id: str, output_index: int) -> dict[str, Any] | None:
        node = workflow.node(node_id)
        try:
            recipe = static.recipe(Link(node_id, output_index), f"{node.class_type}[{output_index}]")
        except NotOffloadable:
            return None
        return recipe.to_dict()

    return recipe_for
