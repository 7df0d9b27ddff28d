"""``diffsplit batch --ray``: the batch as a Ray Data pipeline (its stages: :mod:`diffsplit.ray_stages`).

::

    items ─▶ prepare (CPU actors) ─▶ sample (actor pool, batches) ─▶ finish (driver's machine) ─▶ manifest

Ray streams items through the three stages, so prompts are encoded while the
sampling actors sample and images are saved while the next batch samples. A
sampling actor that dies (its process killed, its machine gone) is restarted
by Ray and its batch retried on it (``max_restarts``/``max_task_retries``);
an item's own failure (a missing model, a node error) is a ``failed`` line of
the manifest and the batch goes on. The manifest, the resume rule and the
progress bar are those of the plain batch.

Every actor opens ``--models``, ``--inputs`` and the workflow itself: on a
cluster these paths must exist on every machine (a shared folder). Images are
written by the finishing actor, which runs on the driver's machine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffsplit.batch_items import BatchItem
from diffsplit.batch_manifest import FAILED, OK, Manifest, ManifestEntry
from diffsplit.batch_run import BatchSummary, seed_of
from diffsplit.engine.errors import Interrupted
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.ray_connect import RayUnavailable, ray_error_line, ray_session
from diffsplit.ray_stages import FinishStage, PrepareStage, SampleStage, StageSettings, new_row

#: Logical CPUs each preparing actor takes (encoding a prompt is short; the samplers get whole CPUs).
PREPARE_CPUS = 0.5
#: The label of every Ray node naming it (the finishing actor runs on the driver's node).
NODE_ID_LABEL = "ray.io/node-id"


class ItemProgress(Protocol):
    def finished(self, entry: ManifestEntry) -> None: ...


@dataclass(frozen=True)
class RayOptions:
    """How the pipeline runs on Ray."""

    address: str  # "local", "auto" or a cluster address
    sampling_actors: int = 1
    preparing_actors: int = 1
    batch_size: int = 4
    gpus_per_actor: float = 0.0
    local_cpus: int | None = None  # logical CPUs of a ``local`` instance (None: this machine's cores)


def run_ray_batch(settings: StageSettings, options: RayOptions, workflow: Workflow, registry: NodeRegistry,
                  items: Sequence[BatchItem], overrides: Mapping[str, Mapping[str, Any]], manifest: Manifest,
                  progress: ItemProgress, *, skipped: int = 0) -> BatchSummary:
    """Run ``items`` through the pipeline; one manifest line each, as each one finishes."""
    import time

    started = time.perf_counter()
    by_key = {item.key: item for item in items}
    counts = {OK: 0, FAILED: 0}
    sampling = settings.sampling
    with ray_session(options.address, local_cpus=options.local_cpus) as ray:
        rows = [new_row(item.key, overrides[item.key]) for item in items]
        dataset = _pipeline(ray, settings, options, rows)
        try:
            for row in dataset.iter_rows():
                item = by_key[row["key"]]
                entry = _entry(row, item, workflow, registry, manifest, sampling)
                manifest.append(entry)
                counts[entry.status] += 1
                progress.finished(entry)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except ray.exceptions.RayError as exc:
            raise RayUnavailable(f"the Ray pipeline failed: {ray_error_line(exc)}") from None
    return BatchSummary(counts[OK], skipped, counts[FAILED], time.perf_counter() - started)


def _pipeline(ray: Any, settings: StageSettings, options: RayOptions, rows: list[dict[str, Any]]) -> Any:
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the batch's own bar counts items
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    here = ray.get_runtime_context().get_node_id()
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    dataset = dataset.map(PrepareStage, fn_constructor_args=(settings,),
                          compute=ActorPoolStrategy(size=options.preparing_actors), num_cpus=PREPARE_CPUS)
    # actor pools restart a lost actor and retry its batch on it (Ray Data's defaults: max_restarts=-1,
    # max_task_retries=-1); an item's own error is in its row, never an exception, so it is not retried
    dataset = dataset.map_batches(SampleStage, fn_constructor_args=(settings,), batch_size=options.batch_size,
                                  compute=ActorPoolStrategy(size=options.sampling_actors), num_cpus=1,
                                  num_gpus=options.gpus_per_actor or None)
    return dataset.map(FinishStage, fn_constructor_args=(settings,), compute=ActorPoolStrategy(size=1),
                       num_cpus=0, label_selector={NODE_ID_LABEL: here})


def _entry(row: Mapping[str, Any], item: BatchItem, workflow: Workflow, registry: NodeRegistry,
           manifest: Manifest, sampling: Sequence[str]) -> ManifestEntry:
    times: dict[str, float] = json.loads(row["times"] or "{}")
    times = {"total_s": round(sum(times.values()), 4), **times}
    seed = seed_of(workflow.with_overrides(item.override_map(), registry))
    workers = {node_id: row["worker"] for node_id in sampling} if row["worker"] else {}
    if row["error"]:
        return ManifestEntry(item=item.key, line=item.line, digest=item.digest, status=FAILED,
                             prompt=item.prompt, seed=seed, workers=workers, times=times, error=row["error"])
    outputs = manifest.relative([Path(path) for path in json.loads(row["outputs"])])
    return ManifestEntry(item=item.key, line=item.line, digest=item.digest, status=OK, prompt=item.prompt,
                         seed=seed, outputs=outputs, workers=workers, times=times)

