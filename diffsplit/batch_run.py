"""Running ``diffsplit batch``: one workflow per item, a few items in flight, a manifest line each.

The first item that runs goes alone, so the loaders run once and land in the
shared execution cache; after it, ``ahead`` items run at once. With the
sampler on a worker that is the pipeline the batch needs: while the worker
samples item N, this machine encodes the prompts of item N+1 (and decodes
item N-1), so the worker is not left waiting for the CPU. A failed item is
recorded with its error and the batch goes on; Ctrl-C stops every item in
flight at its next step and keeps what finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from diffsplit.batch_items import BatchItem
from diffsplit.batch_manifest import FAILED, OK, Manifest, ManifestEntry
from diffsplit.engine.errors import EngineError, Interrupted
from diffsplit.engine.execution_cache import ExecutionCache
from diffsplit.engine.executor import Executor, NodeRunner
from diffsplit.engine.graph import Link, Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.wire_values import is_model_value
from diffsplit.transport.errors import DiffsplitError

#: Models kept between items (loader outputs); least recently used go first.
CACHE_ENTRIES = 32
SEED_INPUTS = ("seed", "noise_seed")


class ModelCache(ExecutionCache):
    """Keeps only node outputs that hold a model (the loaders'), so 10,000 items never pile up latents."""

    def put(self, signature: str, outputs: tuple[Any, ...]) -> None:
        if any(is_model_value(value) for value in outputs):
            super().put(signature, outputs)


class Placements(Protocol):
    """Where an offloaded node last ran (``RemoteRunner.placement``)."""

    def placement(self, node_id: str) -> str | None: ...


class ItemProgress(Protocol):
    """What the batch reports as items finish (a tqdm bar in the CLI)."""

    def finished(self, entry: ManifestEntry) -> None: ...


@dataclass(frozen=True)
class BatchSummary:
    """How a batch went: items done now, skipped as already done, failed."""

    done: int
    skipped: int
    failed: int
    seconds: float


@dataclass(frozen=True)
class BatchPlan:
    """Everything one batch runs with."""

    workflow: Workflow
    registry: NodeRegistry
    executor: Executor
    node_runner: NodeRunner
    manifest: Manifest
    ahead: int = 1
    remote: Placements | None = None
    assigned: frozenset[str] = frozenset()


def pending_items(items: Sequence[BatchItem], manifest: Manifest, *, restart: bool) -> list[BatchItem]:
    """The items still to do: all with ``restart``, else those the manifest does not show finished."""
    if restart:
        return list(items)
    finished = manifest.finished()
    return [item for item in items if not manifest.is_done(item, finished.get(item.key))]


def run_batch(plan: BatchPlan, items: Sequence[BatchItem], progress: ItemProgress,
              *, skipped: int = 0) -> BatchSummary:
    """Run ``items`` (already filtered by :func:`pending_items`); every one gets a manifest line."""
    started = time.perf_counter()
    cache = ModelCache(max_entries=CACHE_ENTRIES)
    cancel = threading.Event()
    counts = {OK: 0, FAILED: 0}
    counting = threading.Lock()

    def one(item: BatchItem) -> None:
        entry = run_item(plan, item, cache, cancel)
        plan.manifest.append(entry)
        with counting:
            counts[entry.status] += 1
            progress.finished(entry)

    queue = iter(items)
    first = next(queue, None)
    if first is not None:
        with _cancel_on_interrupt(cancel, {}):
            one(first)  # alone: the loaders run once, then every item finds them in the cache
    with ThreadPoolExecutor(max_workers=plan.ahead, thread_name_prefix="diffsplit-batch") as pool:
        running: dict[Future[None], BatchItem] = {}
        with _cancel_on_interrupt(cancel, running):
            for item in queue:
                while len(running) >= plan.ahead:
                    _collect(running, wait(running, return_when=FIRST_COMPLETED).done)
                running[pool.submit(one, item)] = item
            while running:
                _collect(running, wait(running, return_when=FIRST_COMPLETED).done)
    return BatchSummary(counts[OK], skipped, counts[FAILED], time.perf_counter() - started)


def _collect(running: dict[Future[None], BatchItem], done: set[Future[None]]) -> None:
    for future in done:
        running.pop(future)
        future.result()  # Interrupted (or a bug) surfaces here


@contextmanager
def _cancel_on_interrupt(cancel: threading.Event,
                         running: Mapping[Future[None], BatchItem]) -> Iterator[None]:
    """On Ctrl-C: stop every item in flight at its next step, wait for them, then raise Interrupted."""
    try:
        yield
    except KeyboardInterrupt:
        cancel.set()
        for future in list(running):
            with suppress(Interrupted, KeyboardInterrupt):  # a second Ctrl-C does not abandon them
                future.result()
        raise Interrupted() from None


def run_item(plan: BatchPlan, item: BatchItem, cache: ExecutionCache,
             cancel: threading.Event) -> ManifestEntry:
    """Run one item; its manifest entry (``failed`` with the error when the workflow failed)."""
    started = time.perf_counter()
    overrides = item_overrides(plan.workflow, plan.registry, item)
    workflow = plan.workflow.with_overrides(overrides, plan.registry)
    seed = seed_of(workflow)
    try:
        result = plan.executor.run(workflow, cache=cache, node_runner=plan.node_runner, cancel=cancel)
    except Interrupted:
        raise
    except (EngineError, DiffsplitError) as exc:
        return ManifestEntry(item=item.key, line=item.line, digest=item.digest, status=FAILED,
                             prompt=item.prompt, seed=seed, error=str(exc),
                             times={"total_s": round(time.perf_counter() - started, 4)})
    times = {"total_s": round(time.perf_counter() - started, 4)}
    times.update({node_id: round(t.wall_s, 4) for node_id, t in result.timings.items() if not t.cache_hit})
    return ManifestEntry(
        item=item.key, line=item.line, digest=item.digest, status=OK, prompt=item.prompt, seed=seed,
        outputs=plan.manifest.relative(result.saved_files), workers=_workers(plan, result.executed),
        times=times,
    )


def item_overrides(workflow: Workflow, registry: NodeRegistry, item: BatchItem) -> dict[str, Any]:
    """What one item changes in the workflow: its own overrides, and its images named after it."""
    return {**item.override_map(), **_image_names(workflow, registry, item)}


def _image_names(workflow: Workflow, registry: NodeRegistry, item: BatchItem) -> dict[str, str]:
    """Each image-saving node's prefix set to the item's key (and node id when there are several)."""
    savers = [node.id for node in workflow.nodes.values()
              if registry.get(node.class_type) is not None and registry[node.class_type].output_node
              and isinstance(node.inputs.get("filename_prefix"), str)]
    if len(savers) == 1:
        return {f"{savers[0]}.filename_prefix": item.key}
    return {f"{node_id}.filename_prefix": f"{item.key}-{node_id}" for node_id in savers}


def seed_of(workflow: Workflow) -> int | None:
    """The seed the workflow samples with, when exactly one node has one as a widget."""
    seeds = [value for node in workflow.nodes.values() for name in SEED_INPUTS
             if isinstance(value := node.inputs.get(name), int) and not isinstance(value, Link | bool)]
    return seeds[0] if len(seeds) == 1 else None


def _workers(plan: BatchPlan, executed: Sequence[str]) -> dict[str, str]:
    if plan.remote is None:
        return {}
    from diffsplit.engine.offload import LOCAL

    where: dict[str, str] = {}
    for node_id in executed:
        if node_id not in plan.assigned:
            continue
        placement = plan.remote.placement(node_id)
        where[node_id] = "fallback" if placement == LOCAL else (placement or "local")
    return where
