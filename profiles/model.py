"""What a profile measured: per-node local measurements and, with a worker, remote ones.

Everything here is immutable plain data (frozen dataclasses), built by
:mod:`diffsplit.profiles.measure` and :mod:`diffsplit.profiles.remote_model`,
read by the planner and the reports. Times are seconds, sizes bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemoryStats

Category = Literal["normal", "intermediate", "model"]
Role = Literal["loader", "output", "compute"]
CATEGORIES: tuple[Category, ...] = ("normal", "intermediate", "model")
#: Model kind → dtype of a run whose models computed as loaded (the CPU in float32).
AS_LOADED_DTYPES: Mapping[str, str] = {
    "unet": "fp32", "vae": "fp32", "text_encoder": "fp32", "controlnet": "fp32", "other": "fp32"}


@dataclass(frozen=True)
class InputMeasure:
    """One input of one node as offloading would send it.

    ``category``: ``normal`` (inline value), ``intermediate`` (tensors) or ``model``
    (a recipe, never weights). ``payload_bytes``: the raw tensor bytes, the recipe's
    JSON size, or the encoded size of a plain value. ``wire_bytes``: what the input
    adds to a request. ``zeros``: an all-zero tensor, sent as its shape only.
    ``digest``: the content digest of a CONDITIONING input (a worker that already
    holds it gets the digest instead of the tensors).
    """

    name: str
    type: str
    category: Category
    source: str | None
    payload_bytes: int
    wire_bytes: int
    zeros: bool = False
    digest: str | None = None


@dataclass(frozen=True)
class MemoryMeasure:
    """Peak memory of one node: ``kind`` is ``cuda`` (torch allocator) or ``rss`` (process RSS).

    ``peak_bytes``: the highest value seen while the node ran; ``delta_bytes``: the
    value after the node minus the value before it (memory the node kept).
    """

    kind: Literal["cuda", "rss"]
    peak_bytes: int
    delta_bytes: int


@dataclass(frozen=True)
class NodeMeasure:
    """Everything measured for one node in a local run.

    ``offload_block`` is None when the node could run on a worker, else the reason
    it cannot (loader, output node, returns a model, reads local files, a model
    input without a recipe). ``request_bytes`` / ``reply_bytes``: the wire bytes a
    remote run of this node would send up and receive back. ``weight_bytes``: the
    model files a naive "ship the model" design would send for this node.
    ``recipe_s``: for a loader, the time to work out the recipes of its models (with the
    fingerprint of their weights),
    which the remote runner spends after the loader whenever a plan offloads anything.
    """

    node_id: str
    class_type: str
    title: str
    dependencies: tuple[str, ...]
    role: Role
    cache_hit: bool
    wall_s: float
    cpu_s: float
    memory: MemoryMeasure
    inputs: tuple[InputMeasure, ...] = ()
    request_bytes: int = 0
    reply_bytes: int = 0
    weight_bytes: int = 0
    weight_files: tuple[str, ...] = ()
    offload_block: str | None = None
    recipe_s: float = 0.0

    @property
    def offloadable(self) -> bool:
        """Whether the planner may send this node to a worker."""
        return self.offload_block is None

    def bytes_by_category(self) -> dict[str, int]:
        """Payload bytes of the inputs per category (every category present, 0 when none)."""
        totals = dict.fromkeys(CATEGORIES, 0)
        for item in self.inputs:
            totals[item.category] += item.payload_bytes
        return totals


@dataclass(frozen=True)
class RemoteMeasure:
    """One node measured on a worker (from the remote runner's stats of a warm run).

    ``overhead_s``: the round trip's time beyond queue, rebuild, run and the link
    (encoding, decoding, thread hand-offs); ``cold_rebuild_s``: the model rebuild on
    the first (cold cache) request.
    """

    node_id: str
    run_s: float
    queue_s: float
    rebuild_s: float
    cold_rebuild_s: float
    overhead_s: float
    request_bytes: int
    reply_bytes: int
    recipe_bytes: int
    cache_hits: int
    cache_misses: int


@dataclass(frozen=True)
class WorkflowMeasure:
    """A measured local run of a workflow: nodes in topological order.

    ``total_s``: end-to-end wall time of the measured run; ``overhead_s``: the part
    of it outside the nodes (validation, scheduling), added to every prediction.
    With ``measured_runs`` above 1 both are medians, as are the nodes' times.
    ``device``: where the compute nodes ran (``cpu (2 torch threads)``, ``cuda:0 (...)``);
    ``dtypes``: model kind → the dtype it computed in; ``device_memory``: the device memory
    manager's counters after the runs, None where models ran as loaded (nothing was placed).
    """

    name: str
    nodes: tuple[NodeMeasure, ...]
    total_s: float
    overhead_s: float
    device: str
    warmup_runs: int = 0
    measured_runs: int = 1
    dtypes: Mapping[str, str] = field(default_factory=lambda: dict(AS_LOADED_DTYPES))
    device_memory: DeviceMemoryStats | None = None

    def node(self, node_id: str) -> NodeMeasure:
        """The measure of ``node_id`` (KeyError if it did not run)."""
        for measure in self.nodes:
            if measure.node_id == node_id:
                return measure
        raise KeyError(node_id)

    @property
    def by_id(self) -> Mapping[str, NodeMeasure]:
        """Node id → measure."""
        return {measure.node_id: measure for measure in self.nodes}

    @property
    def candidates(self) -> tuple[str, ...]:
        """Ids of the nodes that could be offloaded, in topological order."""
        return tuple(m.node_id for m in self.nodes if m.offloadable and not m.cache_hit)


@dataclass(frozen=True)
class WorkerInfo:
    """What the worker said about itself, and remote measurements per node."""

    address: str
    slots: int = 1
    remote: Mapping[str, RemoteMeasure] = field(default_factory=dict)
