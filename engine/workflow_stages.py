"""A workflow cut into three stages: what runs before the sampling nodes, the sampling nodes, what runs after.

``diffsplit batch --ray`` runs each stage in its own pool of Ray actors (prompt
encoding on CPUs, sampling where the models are, decoding and saving next to
the manifest). A stage hands the next one only the values that cross the cut:
:attr:`StageSplit.feeds` (outputs of earlier nodes that sampling nodes read)
and :attr:`StageSplit.returns` (outputs of sampling nodes that later nodes read).

The sampling stage is *convex*: a node that lies on a path from one sampling
node to another (a latent upscale between a base and a refiner sampler) joins
it, so no value has to go back to an earlier stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.graph import Link, Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.types import MODEL_TYPES

#: Input types that make a node a sampler when it also returns a LATENT.
_SAMPLER_INPUT_TYPES = frozenset({"MODEL", "GUIDER"})


@dataclass(frozen=True)
class Crossing:
    """One output of one node, read across the cut."""

    node_id: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.node_id}:{self.index}"


@dataclass(frozen=True)
class StageSplit:
    """Which nodes sample, and the values that cross into and out of them."""

    sampling: tuple[str, ...]  # topological order
    feeds: tuple[Crossing, ...]  # outputs of earlier nodes the sampling nodes read
    returns: tuple[Crossing, ...]  # outputs of sampling nodes later nodes read

    @property
    def fed_nodes(self) -> tuple[str, ...]:
        """The earlier nodes whose outputs the sampling stage reads, in first-use order."""
        return tuple(dict.fromkeys(crossing.node_id for crossing in self.feeds))

    @property
    def returning_nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(crossing.node_id for crossing in self.returns))


def sampler_nodes(workflow: Workflow, registry: NodeRegistry) -> tuple[str, ...]:
    """The nodes that sample: a MODEL (or GUIDER) input and a LATENT output (KSampler, SamplerCustom...)."""
    found = []
    for node_id, node in workflow.nodes.items():
        node_class = registry.get(node.class_type) if node.class_type in registry else None
        if node_class is None:
            continue
        takes_model = any(spec.type in _SAMPLER_INPUT_TYPES for spec in node_class.inputs)
        if takes_model and any(output.type == "LATENT" for output in node_class.outputs):
            found.append(node_id)
    return tuple(found)


def split_stages(workflow: Workflow, registry: NodeRegistry, sampling: Iterable[str]) -> StageSplit:
    """Cut ``workflow`` around ``sampling`` (closed over the paths between them); WorkflowError when it
    cannot be cut: an unknown id, an output node among them, or no node after them to finish the run."""
    chosen = set(sampling)
    if not chosen:
        raise WorkflowError("no sampling node to run in the sampling stage (the workflow has no sampler; "
                            "name the nodes with --ray-nodes)")
    for node_id in sorted(chosen):
        node = workflow.node(node_id)
        if node.class_type in registry and registry[node.class_type].output_node:
            raise WorkflowError("an output node cannot run in the sampling stage; it saves where the "
                                "manifest is", node_id=node_id, class_type=node.class_type)
    closed = _convex_closure(workflow, chosen)
    order = tuple(node_id for node_id in workflow.topological_order() if node_id in closed)
    feeds: dict[Crossing, None] = {}
    for node_id in order:
        for link in workflow.node(node_id).links.values():
            if link.node_id not in closed:
                feeds[Crossing(link.node_id, link.output_index)] = None
    returns: dict[Crossing, None] = {}
    for node in workflow.nodes.values():
        if node.id in closed:
            continue
        for link in node.links.values():
            if link.node_id in closed:
                returns[Crossing(link.node_id, link.output_index)] = None
    if not returns:
        raise WorkflowError("nothing reads the sampling nodes' outputs: the run would save nothing "
                            f"from them (sampling nodes: {', '.join(order)})")
    for crossing in returns:  # refused now, not after every item has sampled
        node = workflow.node(crossing.node_id)
        output = registry[node.class_type].outputs[crossing.index]
        if output.type in MODEL_TYPES:
            raise WorkflowError(f"its {output.type} output is read by a later node: only tensors and "
                                "conditioning come back from the sampling stage (add the nodes that use "
                                "it to the sampling nodes)", node_id=crossing.node_id,
                                class_type=node.class_type)
    return StageSplit(sampling=order, feeds=tuple(feeds), returns=tuple(returns))


def _convex_closure(workflow: Workflow, chosen: set[str]) -> frozenset[str]:
    """``chosen`` plus every node on a path from one of them to another."""
    dependents = workflow.dependents()
    downstream: set[str] = set()
    pending = list(chosen)
    while pending:
        for consumer in dependents.get(pending.pop(), frozenset()):
            if consumer not in downstream:
                downstream.add(consumer)
                pending.append(consumer)
    upstream: set[str] = set()
    for node_id in chosen:
        upstream |= workflow.ancestors(node_id)
    return frozenset(chosen | (downstream & upstream))


def crossing_values(outputs: dict[str, tuple[object, ...]],
                    crossings: Iterable[Crossing]) -> dict[str, object]:
    """The values of ``crossings`` from a run's outputs, keyed by :attr:`Crossing.name`."""
    values: dict[str, object] = {}
    for crossing in crossings:
        produced = outputs.get(crossing.node_id)
        if produced is None or crossing.index >= len(produced):
            raise WorkflowError(f"node {crossing.node_id} gave no output {crossing.index} to hand on",
                                node_id=crossing.node_id)
        values[crossing.name] = produced[crossing.index]
    return values


def given_outputs(workflow: Workflow, registry: NodeRegistry, crossings: Iterable[Crossing],
                  values: dict[str, object]) -> dict[str, tuple[object, ...]]:
    """``Executor.run(given=...)`` from crossing values: each node's outputs, None where nothing reads one."""
    given: dict[str, list[object]] = {}
    for crossing in crossings:
        if crossing.name not in values:
            raise WorkflowError(f"the stage before sent no value for {crossing.name}",
                                node_id=crossing.node_id)
        node = workflow.node(crossing.node_id)
        slots = given.setdefault(crossing.node_id, [None] * len(registry[node.class_type].outputs))
        slots[crossing.index] = values[crossing.name]
    return {node_id: tuple(slots) for node_id, slots in given.items()}


__all__ = ["Crossing", "Link", "StageSplit", "crossing_values", "given_outputs", "sampler_nodes",
           "split_stages"]
