"""The workflow graph: nodes, links between their outputs and inputs, and graph queries.

A :class:`Workflow` is immutable. Node ids are strings (ComfyUI uses numbers,
sometimes ``"12:3"`` for expanded group nodes); wherever an order is needed,
ids compare *naturally* (``"2" < "10"``). Validation against a node registry
lives in :mod:`diffsplit.engine.validation`; ``Workflow.validate`` forwards there.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError

if TYPE_CHECKING:
    from diffsplit.engine.nodes.registry import NodeRegistry
    from diffsplit.engine.store import ModelStore

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def node_sort_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """A natural sort key for node ids: numeric runs compare as numbers ("2" < "10" < "10:1")."""
    parts = re.findall(r"\d+|\D+", node_id)
    return tuple((0, int(part)) if part.isdecimal() else (1, part) for part in parts)


@dataclass(frozen=True)
class Link:
    """An input fed by output ``output_index`` of node ``node_id``."""

    node_id: str
    output_index: int


@dataclass(frozen=True)
class Node:
    """One node: its class, its inputs (literal values or links) and free-form metadata.

    ``meta`` carries ``title`` and ``remote`` (a worker address such as
    ``tcp://gpu:5555``) when the workflow names them.
    """

    id: str
    class_type: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def links(self) -> Mapping[str, Link]:
        """The inputs fed by links, by input name."""
        return {name: value for name, value in self.inputs.items() if isinstance(value, Link)}

    @property
    def literals(self) -> Mapping[str, Any]:
        """The inputs given as plain values, by input name."""
        return {name: value for name, value in self.inputs.items() if not isinstance(value, Link)}

    @property
    def title(self) -> str:
        """The display title (the class name when the workflow gives none)."""
        return str(self.meta.get("title") or self.class_type)

    @property
    def remote(self) -> str | None:
        """The worker address this node is labelled to run on, if any."""
        remote = self.meta.get("remote")
        return str(remote) if remote else None

    def with_inputs(self, **changes: Any) -> Node:
        """A copy with some inputs replaced or added."""
        return replace(self, inputs={**self.inputs, **changes})

    def with_meta(self, **changes: Any) -> Node:
        """A copy with some metadata replaced or added."""
        return replace(self, meta={**self.meta, **changes})


@dataclass(frozen=True)
class Workflow:
    """An immutable graph of nodes keyed by id.

    ``source_format`` is ``"api"``, ``"ui"`` or ``"code"``; ``extra`` keeps what the
    source carried besides the graph (``extra["workflow"]``: the UI form, embedded
    in saved PNGs next to the API form).
    """

    nodes: Mapping[str, Node]
    source_format: str = "code"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, node in self.nodes.items():
            if key != node.id:
                raise WorkflowError(f"node stored under id {key!r} has id {node.id!r}", node_id=key)
        ordered = dict(sorted(self.nodes.items(), key=lambda item: node_sort_key(item[0])))
        object.__setattr__(self, "nodes", MappingProxyType(ordered))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @classmethod
    def of(cls, *nodes: Node, source_format: str = "code", extra: Mapping[str, Any] = _EMPTY) -> Workflow:
        """A workflow of the given nodes (ids must be unique)."""
        by_id: dict[str, Node] = {}
        for node in nodes:
            if node.id in by_id:
                raise WorkflowError("duplicate node id", node_id=node.id, class_type=node.class_type)
            by_id[node.id] = node
        return cls(by_id, source_format, extra)

    def node(self, node_id: str) -> Node:
        """The node with id ``node_id``; a WorkflowError listing the ids if there is none."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise WorkflowError(f"no node with id {node_id!r}; ids: {', '.join(self.nodes)}") from None

    def dependencies(self, node_id: str) -> frozenset[str]:
        """Ids of the nodes whose outputs feed ``node_id`` (ids not in the workflow included)."""
        return frozenset(link.node_id for link in self.node(node_id).links.values())

    def dependents(self) -> Mapping[str, frozenset[str]]:
        """For every node id, the ids of the nodes that consume its outputs."""
        consumers: dict[str, set[str]] = {node_id: set() for node_id in self.nodes}
        for node in self.nodes.values():
            for link in node.links.values():
                if link.node_id in consumers:
                    consumers[link.node_id].add(node.id)
        return {node_id: frozenset(ids) for node_id, ids in consumers.items()}

    def ancestors(self, node_id: str) -> frozenset[str]:
        """Ids of every node ``node_id`` depends on, directly or not (itself excluded)."""
        seen: set[str] = set()
        pending = [node_id]
        while pending:
            for parent in self.dependencies(pending.pop()):
                if parent not in seen and parent in self.nodes:
                    seen.add(parent)
                    pending.append(parent)
        seen.discard(node_id)
        return frozenset(seen)

    def restricted_to(self, node_ids: Iterable[str]) -> Workflow:
        """The sub-workflow of the given nodes (links to dropped nodes are kept as they are)."""
        keep = set(node_ids)
        return replace(self, nodes={node_id: node for node_id, node in self.nodes.items() if node_id in keep})

    def with_node(self, node: Node) -> Workflow:
        """A copy with ``node`` added or replaced."""
        return replace(self, nodes={**self.nodes, node.id: node})

    def check_links_resolve(self) -> None:
        """Raise a WorkflowError for the first link that names a node not in the workflow."""
        for node in self.nodes.values():
            for name, link in node.links.items():
                if link.node_id not in self.nodes:
                    raise WorkflowError(
                        f"links to node {link.node_id}, which is not in the workflow",
                        node_id=node.id,
                        class_type=node.class_type,
                        input_name=name,
                    )

    def topological_order(self) -> tuple[str, ...]:
        """Node ids so that every node comes after its inputs' nodes.

        Deterministic (Kahn's algorithm, ties broken by natural id order). Links to
        nodes outside the workflow are ignored here (``validate`` reports them). A
        cycle raises a WorkflowError that names the nodes on it.
        """
        consumers = self.dependents()
        waiting = {node_id: len(self.dependencies(node_id) & self.nodes.keys()) for node_id in self.nodes}
        ready = [(node_sort_key(node_id), node_id) for node_id, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, node_id = heapq.heappop(ready)
            order.append(node_id)
            for consumer in consumers[node_id]:
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    heapq.heappush(ready, (node_sort_key(consumer), consumer))
        if len(order) < len(self.nodes):
            cycle = self.find_cycle(set(self.nodes) - set(order))
            described = " -> ".join(f"{node_id} ({self.nodes[node_id].class_type})" for node_id in cycle)
            raise WorkflowError(f"the workflow has a cycle: {described}", node_id=cycle[0])
        return tuple(order)

    def find_cycle(self, candidates: set[str]) -> tuple[str, ...]:
        """One cycle among ``candidates`` as ids, first node repeated at the end."""
        start = min(candidates, key=node_sort_key)
        path: list[str] = [start]
        position = {start: 0}
        while True:
            parents = sorted((p for p in self.dependencies(path[-1]) if p in candidates), key=node_sort_key)
            step = parents[0]
            if step in position:
                loop = path[position[step] :]
                loop.reverse()  # walk it in data-flow direction, from its smallest id
                first = loop.index(min(loop, key=node_sort_key))
                loop = loop[first:] + loop[:first]
                return (*loop, loop[0])
            position[step] = len(path)
            path.append(step)

    def output_node_ids(self, registry: NodeRegistry) -> tuple[str, ...]:
        """Ids of the nodes whose class is an output node (SaveImage, PreviewImage...)."""
        return tuple(
            node_id
            for node_id, node in self.nodes.items()
            if node.class_type in registry and registry[node.class_type].output_node
        )

    def needed_for(self, targets: Iterable[str]) -> frozenset[str]:
        """The targets and all their ancestors: the nodes that must run to produce the targets."""
        needed: set[str] = set()
        for target in targets:
            self.node(target)
            needed.add(target)
            needed |= self.ancestors(target)
        return frozenset(needed)

    def validate(self, registry: NodeRegistry, store: ModelStore | None = None) -> None:
        """Raise a WorkflowError naming node, class and input for the first problem found.

        See :func:`diffsplit.engine.validation.validate_workflow` for what is checked.
        """
        from diffsplit.engine.validation import validate_workflow

        validate_workflow(self, registry, store)

    def with_overrides(self, overrides: Mapping[str, Any], registry: NodeRegistry | None = None) -> Workflow:
        """A copy with inputs set from ``{"NODE.INPUT": value}`` (see :mod:`.overrides`)."""
        from diffsplit.engine.overrides import apply_overrides

        return apply_overrides(self, overrides, registry)
