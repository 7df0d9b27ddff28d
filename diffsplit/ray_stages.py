"""The three stages of ``diffsplit batch --ray``, as the classes Ray Data runs in its actors.

- :class:`PrepareStage` (CPU actors): an item's workflow up to the sampling
  nodes: prompts encoded, latents made. Models are handed on as recipes (the
  loaders here return deferred handles, so a model only the samplers use is
  never loaded here), everything else as tensors.
- :class:`SampleStage` (the actor pool where the models live): rebuilds each
  model from its recipe out of this machine's store (kept in the actor's cache
  from one batch to the next), runs the sampling nodes of a batch of items in
  lockstep (one UNet pass per step for the whole batch, each item with its own
  noise, seed, CFG and conditioning), and hands the latents on.
- :class:`FinishStage` (one actor, on the driver's machine): decodes and saves
  the images where the manifest is.

Between stages a row carries only plain fields and ``payload``: the crossing
values encoded by diffsplit's own envelope codec (msgpack and raw tensor
frames), so a stage never unpickles another's values; Ray moves the bytes.
A failure of one item (a missing model, a node error) is carried in its row's
``error`` to the manifest; the batch goes on.

Nothing here imports Ray: the classes are plain, and :mod:`diffsplit.ray_batch`
hands them to Ray Data.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.executor import Executor, NodeCall, NodeRunner, run_node_locally
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.workflow_stages import StageSplit, crossing_values, given_outputs, split_stages
from diffsplit.transport.errors import DiffsplitError, MalformedMessage
from diffsplit.transport.packed import pack_message, unpack_message

if TYPE_CHECKING:
    from diffsplit.remote.batching import Member

log = logging.getLogger(__name__)
#: Models kept by a preparing or finishing actor between items (loader outputs).
CACHE_ENTRIES = 32
#: What a sampling actor's model cache may hold (as a worker's default ``--cache-gb``).
SAMPLE_CACHE_BYTES = 8 << 30
#: Row fields, every stage: the item, what it overrides, how it went, and the values crossing the cut.
ROW_FIELDS = ("key", "overrides", "payload", "error", "times", "worker", "outputs")


@dataclass(frozen=True)
class StageSettings:
    """What every stage actor is built from: plain data, the same on every machine of the cluster."""

    workflow_source: Mapping[str, Any]  # the workflow document (API or UI form), ``--set`` applied later
    sets: tuple[str, ...]
    models: str
    extra_model_paths: str | None
    inputs: str
    out: str
    sampling: tuple[str, ...]  # the sampling node ids asked for (closed over the paths between them)
    device: Mapping[str, str] = field(default_factory=dict)  # --device/--dtype flags for the sampling actors
    vram_bytes: int | None = None
    threads: int | None = None  # intra-op threads of one actor (None: as Ray sets them, one per CPU)


@dataclass(frozen=True)
class _Environment:
    registry: NodeRegistry
    store: ModelStore
    workflow: Workflow
    split: StageSplit


def open_environment(settings: StageSettings) -> _Environment:
    """Registry, store, workflow and its cut, as every actor (and the driver, to check first) sees them."""
    from diffsplit.engine.extra_paths import open_store
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.overrides import parse_set_options

    registry = default_registry()
    store = open_store(settings.models, settings.extra_model_paths)
    workflow = load_workflow(settings.workflow_source, registry)
    overrides = parse_set_options(list(settings.sets))
    if overrides:
        workflow = workflow.with_overrides(overrides, registry)
    return _Environment(registry, store, workflow, split_stages(workflow, registry, settings.sampling))


def encode_values(values: Mapping[str, Any]) -> bytes:
    """Wire values (tensors anywhere) as one bytes object (``transport.packed``)."""
    return pack_message({"values": dict(values)})


def decode_values(payload: bytes) -> dict[str, Any]:
    """The inverse of :func:`encode_values`; MalformedMessage for anything else (never unpickled)."""
    values = unpack_message(payload).get("values")
    if not isinstance(values, dict):
        raise MalformedMessage("a stage payload holds a map of values")
    return values


def worker_name() -> str:
    """How the manifest names where a stage ran: ``ray:HOST:PID``."""
    return f"ray:{socket.gethostname()}:{os.getpid()}"


class _Stage:
    """What the three stages share: the environment, the item's workflow, row bookkeeping."""

    def __init__(self, settings: StageSettings) -> None:
        self.settings = settings
        self.env = open_environment(settings)
        if settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)

    def item_workflow(self, row: Mapping[str, Any]) -> Workflow:
        overrides = json.loads(row["overrides"])
        if not overrides:
            return self.env.workflow
        return self.env.workflow.with_overrides(overrides, self.env.registry)

    def close(self) -> None:
        """Stop what the stage started (Ray ends the actor's process anyway; tests call this)."""

    def executor(self, output_dir: Path, *, max_workers: int = 1) -> Executor:
        return Executor(self.env.registry, self.env.store, inputs_dir=Path(self.settings.inputs),
                        output_dir=output_dir, max_workers=max_workers)


def _timed(row: dict[str, Any], name: str, started: float) -> None:
    times = json.loads(row["times"] or "{}")
    times[name] = round(time.perf_counter() - started, 4)
    row["times"] = json.dumps(times)


def _failed(row: dict[str, Any], stage: str, exc: Exception) -> dict[str, Any]:
    """The row of an item that failed in ``stage``: its error for the manifest, nothing to hand on."""
    if isinstance(exc, DiffsplitError):
        why = str(exc)
    else:  # not one of ours: the traceback goes to the actor's log, the type to the manifest
        log.error("item %s failed %s", row.get("key"), stage, exc_info=exc)
        why = f"{type(exc).__name__}: {exc}"
    return {**row, "payload": b"", "error": f"{stage}: {why}"}


class PrepareStage(_Stage):
    """Stage 1: everything the sampling nodes read, models as recipes. One item per call."""

    def __init__(self, settings: StageSettings) -> None:
        super().__init__(settings)
        from diffsplit.batch_run import ModelCache

        self.cache = ModelCache(max_entries=CACHE_ENTRIES)
        self._temp = tempfile.TemporaryDirectory(prefix="diffsplit-prepare-")
        self._executor = self.executor(Path(self._temp.name))
        self._runner = _recipe_runner(self.env)

    def close(self) -> None:
        self._runner.close()
        self._temp.cleanup()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"]:
            return row
        from diffsplit.engine.wire_values import to_wire

        started = time.perf_counter()
        split = self.env.split
        try:
            workflow = self.item_workflow(row)
            result = self._executor.run(workflow, targets=split.fed_nodes, cache=self.cache,
                                        node_runner=self._runner)
            values = crossing_values(dict(result.outputs), split.feeds)
            wire = {name: to_wire(value, self._runner.recipe_of, where=f"output {name}")
                    for name, value in values.items()}
            row = {**row, "payload": encode_values(wire)}
        except Exception as exc:  # the item's failure, never the pipeline's (Ray would not retry it)
            return _failed(row, "preparing", exc)
        _timed(row, "prepare_s", started)
        return row


class SampleStage(_Stage):
    """Stage 2: the sampling nodes of a batch of items, in lockstep, with models rebuilt from recipes."""

    def __init__(self, settings: StageSettings) -> None:
        super().__init__(settings)
        from diffsplit.engine.device_memory import DeviceMemory
        from diffsplit.engine.folder_views import FolderViews
        from diffsplit.engine.wire_values import HintTable
        from diffsplit.remote.batching import BatchMembership
        from diffsplit.remote.builder import ModelBuilder
        from diffsplit.remote.cache import ModelCache

        device = dict(settings.device)
        self.memory = DeviceMemory.from_settings(
            device.get("device", "auto"), dtype=device.get("dtype", "auto"),
            unet_dtype=device.get("unet_dtype", "auto"), vae_dtype=device.get("vae_dtype", "auto"),
            text_encoder_dtype=device.get("text_encoder_dtype", "auto"), budget_bytes=settings.vram_bytes)
        policy = self.memory.policy
        self.builder = ModelBuilder(self.env.store, self.env.registry, ModelCache(SAMPLE_CACHE_BYTES),
                                    master_dtypes=None if policy.all_float32 else policy,
                                    views=FolderViews([self.env.store.find_file]))
        self.hints = HintTable()
        self.membership = BatchMembership()
        self._temp = tempfile.TemporaryDirectory(prefix="diffsplit-sample-")
        self._executor = self.executor(Path(self._temp.name))
        self.name = worker_name()

    def close(self) -> None:
        self._temp.cleanup()

    def _node_runner(self, member: Member | None) -> NodeRunner:
        """Runs the item's sampling nodes; in a batch, their UNet calls go through the batch's group (the
        executor calls this on its own thread, so the member is given, not looked up per thread)."""
        from diffsplit.remote.batching import in_group
        from diffsplit.transport.compute_threads import intra_op_threads

        def batched(call: NodeCall) -> Sequence[Any]:
            with intra_op_threads(1 if member is not None else None):  # the shared passes use the rest
                return run_node_locally(replace(call, inputs=in_group(dict(call.inputs), member)))

        memory = self.memory
        if memory.device.type == "cpu" and memory.policy.all_float32 and memory.budget_bytes is None:
            return batched
        from diffsplit.engine.device_runner import DeviceNodeRunner

        return DeviceNodeRunner(batched, memory)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        rows = batch_rows(batch)
        live = [index for index, row in enumerate(rows) if not row["error"]]
        done: dict[int, dict[str, Any]] = {}
        if len(live) == 1:
            done[live[0]] = self._sample(rows[live[0]], None)
        elif live:
            done.update(self._sample_together([rows[index] for index in live], live))
        return rows_batch([done.get(index, row) for index, row in enumerate(rows)])

    def _sample_together(self, rows: Sequence[dict[str, Any]],
                         indexes: Sequence[int]) -> dict[int, dict[str, Any]]:
        from diffsplit.engine.sampling.lockstep import LockstepGroup
        from diffsplit.remote.batching import Member

        group = LockstepGroup(len(rows), pass_threads=self.settings.threads)
        results: dict[int, dict[str, Any]] = {}
        crashed: list[BaseException] = []

        def member(position: int) -> None:
            try:
                results[indexes[position]] = self._sample(rows[position], Member(group, position))
            except BaseException as exc:  # re-raised below: Ray retries or reports the batch
                crashed.append(exc)

        threads = [threading.Thread(target=member, args=(position,), name=f"diffsplit-ray-member-{position}")
                   for position in range(len(rows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if crashed:
            raise crashed[0]
        return results

    def _sample(self, row: dict[str, Any], member: Member | None) -> dict[str, Any]:
        from diffsplit.engine.wire_values import from_wire, to_wire

        started = time.perf_counter()
        split = self.env.split
        self.membership.join(member)
        try:
            workflow = self.item_workflow(row)
            wire = decode_values(row["payload"])
            values = {name: from_wire(value, self.builder.build, None, self.hints)
                      for name, value in wire.items()}
            given = given_outputs(workflow, self.env.registry, split.feeds, values)
            result = self._executor.run(workflow, targets=split.returning_nodes, given=given,
                                        node_runner=self._node_runner(member))
            outputs = crossing_values(dict(result.outputs), split.returns)
            back = encode_values({name: to_wire(value, self.builder.recipe_of, where=f"output {name}")
                                  for name, value in outputs.items()})
        except Exception as exc:  # the item's failure (a build, a node, a reply too large), not its batch's
            return {**_failed(row, "sampling", exc), "worker": self.name}
        finally:
            self.membership.leave()  # the last member to leave records the batch
        row = {**row, "payload": back, "worker": self.name}
        _timed(row, "sample_s", started)
        return row


class FinishStage(_Stage):
    """Stage 3: what follows the sampling nodes (decode, save), writing into ``--out``. One item per call."""

    def __init__(self, settings: StageSettings) -> None:
        super().__init__(settings)
        from diffsplit.batch_run import ModelCache

        self.cache = ModelCache(max_entries=CACHE_ENTRIES)
        self._executor = self.executor(Path(settings.out))
        self._runner = deferring_runner  # only the outputs used here (the VAE) are built

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"]:
            return row
        from diffsplit.engine.wire_values import from_wire

        started = time.perf_counter()
        split = self.env.split
        try:
            workflow = self.item_workflow(row)
            wire = decode_values(row["payload"])
            values = {name: from_wire(value, _no_models, None) for name, value in wire.items()}
            given = given_outputs(workflow, self.env.registry, split.returns, values)
            result = self._executor.run(workflow, given=given, cache=self.cache, node_runner=self._runner)
        except Exception as exc:  # a node error, a full disk: this item fails, the batch goes on
            return _failed(row, "finishing", exc)
        row = {**row, "payload": b"", "outputs": json.dumps([str(path) for path in result.saved_files])}
        _timed(row, "finish_s", started)
        return row


def _recipe_runner(env: _Environment) -> Any:
    """Runs every node here, loaders deferred, and knows each model's recipe by the item's own workflow
    (its overrides, a LoRA strength among them, are in the recipe)."""
    from diffsplit.engine.offload import RemoteRunner
    from diffsplit.engine.trace_workflow import output_recipe_source

    return RemoteRunner({}, output_recipe_source(env.workflow, env.registry, env.store),
                        local_store=env.store,
                        recipes_for=lambda item: output_recipe_source(item, env.registry, env.store))


def deferring_runner(call: NodeCall) -> Sequence[Any]:
    """Loaders return handles, built only when a node here uses one; other nodes run here."""
    from diffsplit.engine.lazy_models import can_defer, defer_loader

    if can_defer(call.node_class):
        return defer_loader(call.node.id, call.node_class, call.context, call.inputs)
    return run_node_locally(call)


def _no_models(recipe: Mapping[str, Any]) -> Any:
    raise WorkflowError("a sampling node returned a model; only tensors and conditioning come back from "
                        "the sampling stage (add the nodes that use it to --ray-nodes)")


def batch_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ray Data's column batch (name → array of values) as one dict per row."""
    names = list(batch)
    columns = [list(batch[name]) for name in names]
    return [{name: _plain(value) for name, value in zip(names, values, strict=True)}
            for values in zip(*columns, strict=True)]


def rows_batch(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The inverse of :func:`batch_rows`."""
    return {name: [row[name] for row in rows] for name in (rows[0] if rows else ROW_FIELDS)}


def _plain(value: Any) -> Any:
    """NumPy scalars and byte arrays from a column back to str/bytes/int."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def new_row(key: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the first stage takes it."""
    return {"key": key, "overrides": json.dumps(dict(overrides), default=str), "payload": b"", "error": "",
            "times": "{}", "worker": "", "outputs": "[]"}


RowStage = Callable[[dict[str, Any]], dict[str, Any]]
