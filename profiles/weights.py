"""Weight bytes a naive "ship the model" design would send to run a node remotely.

diffsplit sends recipes; the comparison a user wants is against sending the
model files themselves. For a node, those are the files behind its model
inputs: walk each model-typed input back through its loader chain (a LoRA
loader's ``model`` input leads to the checkpoint) and sum the store sizes of
every file a loader names. Conditioning carries ControlNet hints, so a
CONDITIONING input is followed back to the ControlNets applied to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffsplit.engine.errors import EngineError
from diffsplit.engine.graph import Link, Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.types import MODEL_TYPES

_CONDITIONING = "CONDITIONING"
_CONTROL_NET = "CONTROL_NET"


@dataclass(frozen=True)
class WeightFiles:
    """The model files behind a node's inputs (store-relative names) and their total size."""

    files: tuple[str, ...]
    total_bytes: int


def naive_weight_files(
    workflow: Workflow, registry: NodeRegistry, store: ModelStore | None, node_id: str
) -> WeightFiles:
    """The files a naive design would ship to run ``node_id`` remotely (each file once)."""
    loaders: set[str] = set()
    visited: set[tuple[str, str]] = set()
    node = workflow.node(node_id)
    node_class = registry.get(node.class_type)
    for name, value in node.links.items():
        spec = node_class.input(name)
        if spec is not None:
            _follow(workflow, registry, value, spec.type, loaders, visited)
    sizes: dict[str, int] = {}
    for loader_id in sorted(loaders):
        sizes.update(_files_of(workflow, registry, store, loader_id))
    return WeightFiles(tuple(sorted(sizes)), sum(sizes.values()))


def _follow(
    workflow: Workflow, registry: NodeRegistry, link: Link, input_type: str,
    loaders: set[str], visited: set[tuple[str, str]],
) -> None:
    """Collect the nodes naming model files behind one link of the given type."""
    key = (link.node_id, input_type)
    if key in visited or link.node_id not in workflow.nodes:
        return
    visited.add(key)
    producer = workflow.node(link.node_id)
    producer_class = registry.get(producer.class_type)
    if input_type in MODEL_TYPES:
        loaders.add(producer.id)
        wanted = MODEL_TYPES
    elif input_type == _CONDITIONING:
        wanted = frozenset({_CONDITIONING, _CONTROL_NET})
    else:
        return
    for name, value in producer.links.items():
        spec = producer_class.input(name)
        if spec is not None and spec.type in wanted:
            _follow(workflow, registry, value, spec.type, loaders, visited)


def _files_of(
    workflow: Workflow, registry: NodeRegistry, store: ModelStore | None, node_id: str
) -> dict[str, int]:
    """Store-relative name → size of each model file a loader node names in its inputs."""
    node = workflow.node(node_id)
    node_class = registry.get(node.class_type)
    found: dict[str, int] = {}
    for spec in node_class.inputs:
        name = node.inputs.get(spec.name)
        if spec.model_folder is None or not isinstance(name, str):
            continue
        relative = f"{spec.model_folder}/{name}"
        if store is None:
            found[relative] = 0
            continue
        try:
            found[relative] = store.entry(store.resolve(spec.model_folder, name)).bytes
        except EngineError:
            found[relative] = 0
    return found
