"""``diffsplit batch``: arguments and the command (the work is in :mod:`diffsplit.batch_run`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.arg_types import non_negative_float, positive_int
from diffsplit.client_args import add_client_arguments, add_loading_argument, add_priority_argument
from diffsplit.condition_args import add_condition_arguments, condition_settings
from diffsplit.device_args import add_device_arguments

if TYPE_CHECKING:
    from diffsplit.batch_items import BatchItem
    from diffsplit.batch_manifest import ManifestEntry
    from diffsplit.engine.graph import Workflow
    from diffsplit.engine.nodes.registry import NodeRegistry

MANIFEST_NAME = "manifest.jsonl"


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``batch`` sub-command's arguments."""
    parser.add_argument("items", help="the prompts: text (one per line), .jsonl (one object per line: "
                        "prompt, negative, id, and overrides such as seed, steps, cfg or NODE.INPUT) or .csv "
                        "(a header row of the same keys)")
    parser.add_argument("--workflow", required=True, help="workflow JSON file run for each item")
    parser.add_argument("--models", required=True, help="ComfyUI-style models folder")
    parser.add_argument("--extra-model-paths", metavar="YAML",
                        help="ComfyUI extra_model_paths.yaml: more folders for each kind of model")
    parser.add_argument("--out", default="out", help="where images and the manifest go (default: ./out)")
    parser.add_argument("--inputs", default="input", help="where LoadImage reads (default: ./input)")
    parser.add_argument("--manifest", metavar="FILE",
                        help=f"the manifest (JSON lines, one per item; default: OUT/{MANIFEST_NAME}); items "
                        "it shows finished, unchanged, with their images present, are not redone")
    parser.add_argument("--restart", action="store_true",
                        help="redo every item, whatever the manifest says (new lines are appended)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input for every item (an item's own value wins; repeatable)")
    parser.add_argument("--prompt-input", action="append", default=[], metavar="NODE.INPUT",
                        help="where an item's prompt goes (repeatable; default: the text of the encoder "
                        "feeding the sampler's positive input)")
    parser.add_argument("--remote", action="append", default=[], metavar="NODE=ADDR",
                        help="run a node on a worker, as for `diffsplit run` (repeatable; ADDR may list "
                        "several workers, comma-separated)")
    parser.add_argument("--ahead", type=positive_int, default=None, metavar="N",
                        help="items in flight at once after the first (default: 2 when nodes run remotely, "
                        "so this machine encodes the next prompt while a worker samples; else 1)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="nodes of one item run at once (default: 2 when some run remotely; else 1)")
    parser.add_argument("--upload-missing", action="store_true",
                        help="send a model file once to a worker that lacks it (needs --allow-upload there)")
    parser.add_argument("--fallback", choices=("local",), default=None,
                        help="local: a node whose workers are all gone or overloaded runs here instead")
    add_ray_arguments(parser)
    add_client_arguments(parser)
    add_priority_argument(parser)
    add_loading_argument(parser)
    add_device_arguments(parser, what="the nodes run here")
    add_condition_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and its settings: the batch as a Ray Data pipeline (``diffsplit[ray]``)."""
    group = parser.add_argument_group("on Ray (pip install 'diffsplit[ray]')")
    group.add_argument("--ray", metavar="ADDRESS",
                       help="run the batch as a Ray Data pipeline: prompts prepared in CPU actors, the "
                       "sampling nodes in a pool of actors holding the models, images saved here. ADDRESS: "
                       "local (start a Ray instance in this process), auto (the running cluster) or a "
                       "cluster address")
    group.add_argument("--ray-nodes", metavar="NODE[,NODE...]",
                       help="the nodes the sampling actors run (default: every sampler node; nodes between "
                       "two of them join them)")
    group.add_argument("--ray-actors", type=positive_int, default=1, metavar="N",
                       help="sampling actors (default 1; each takes a CPU, and --ray-gpus GPUs)")
    group.add_argument("--ray-prepare-actors", type=positive_int, default=1, metavar="N",
                       help="actors encoding prompts ahead of the samplers (default 1)")
    group.add_argument("--ray-batch", type=positive_int, default=None, metavar="N",
                       help="items one sampling actor samples together, one UNet pass per step for all "
                       "(default: 4, or 8 with --ray-gpus)")
    group.add_argument("--ray-gpus", type=non_negative_float, default=0.0, metavar="F",
                       help="GPUs per sampling actor (default 0: the CPU; fractions share a GPU)")
    group.add_argument("--ray-threads", type=positive_int, default=None, metavar="N",
                       help="intra-op CPU threads of each actor (default: this process's count, so an item "
                       "sampled alone, --ray-batch 1, equals `diffsplit run` here bit for bit)")
    group.add_argument("--ray-cpus", type=positive_int, default=None, metavar="N",
                       help="logical CPUs of a --ray local instance (default: this machine's cores)")


def check_items(items: Sequence[BatchItem], workflow: Workflow, registry: NodeRegistry, store: Any) -> None:
    """Every item must make a valid workflow before the first one runs: all the bad ones, by line."""
    from diffsplit.batch_items import MAX_LISTED_ERRORS, BatchItemsError
    from diffsplit.engine.errors import WorkflowError

    errors = []
    for item in items:
        try:
            workflow.with_overrides(item.override_map(), registry).validate(registry, store)
        except WorkflowError as exc:
            errors.append(f"line {item.line} (item {item.key}): {exc}")
    if errors:
        listed = errors[:MAX_LISTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(listed)} more" if len(errors) > len(listed) else ""
        raise BatchItemsError(f"{len(errors)} item(s) would not run:\n  " + "\n  ".join(listed) + more)


class _Bar:
    """A tqdm bar over the items: rate, ETA, and the count of failed items."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="item", desc="batch", disable=quiet,
                         file=sys.stderr, dynamic_ncols=True)
        self._failed = 0

    def finished(self, entry: ManifestEntry) -> None:
        from diffsplit.batch_manifest import FAILED

        if entry.status == FAILED:
            self._failed += 1
            self._bar.write(f"item {entry.item} (line {entry.line}) failed: {entry.error}", file=sys.stderr)
            self._bar.set_postfix(failed=self._failed)
        self._bar.update(1)

    def waiting(self, call: Any, why: str) -> None:
        """A node waits on its worker: shown beside the bar, not as a log line per item."""
        self._bar.set_postfix_str(f"node {call.node.id}: {why[:80]}")

    def close(self) -> None:
        self._bar.close()


def batch_command(args: argparse.Namespace) -> int:
    """Run the workflow for every item; 0 when all finished, 1 when some failed (see the manifest)."""
    from diffsplit.batch_items import read_items
    from diffsplit.batch_manifest import Manifest
    from diffsplit.batch_run import BatchPlan, pending_items, run_batch
    from diffsplit.commands import load_for_run, local_device_for, master_dtypes_for, remote_runner_for
    from diffsplit.engine.executor import Executor, run_node_locally
    from diffsplit.engine.remote_assign import assign_remotes, describe_assignment
    from diffsplit.progress import ProgressPrinter

    printer = ProgressPrinter(quiet=args.quiet)
    registry, store, workflow = load_for_run(args)
    items = read_items(Path(args.items), workflow, prompt_targets=args.prompt_input)
    check_items(items, workflow, registry, store)
    out = Path(args.out)
    manifest = Manifest(Path(args.manifest) if args.manifest else out / MANIFEST_NAME)
    todo = pending_items(items, manifest, restart=args.restart)
    skipped = len(items) - len(todo)
    if skipped:
        printer.message(f"{skipped} of {len(items)} item(s) already done (per {manifest.path}); "
                        "--restart redoes them")
    if args.ray is not None:
        return _ray_batch_command(args, workflow, registry, todo, manifest, skipped, len(items))
    assigned = assign_remotes(workflow, registry, args.remote)
    if assigned:
        printer.message("remote nodes:\n" + describe_assignment(assigned, workflow))
    memory = local_device_for(args, printer)
    executor = Executor(registry, store, inputs_dir=Path(args.inputs), output_dir=out,
                        max_workers=args.workers or (2 if assigned else 1),
                        master_dtypes=master_dtypes_for(memory), conditions=condition_settings(args))
    bar = _Bar(len(items), skipped, args.quiet)
    runner = (remote_runner_for(assigned, workflow, registry, store, args, on_waiting=bar.waiting)
              if assigned else None)
    inner: Any = runner or run_node_locally
    if memory is not None:
        from diffsplit.engine.device_runner import DeviceNodeRunner

        inner = DeviceNodeRunner(inner, memory, elsewhere=lambda node_id: node_id in assigned)
    plan = BatchPlan(workflow=workflow, registry=registry, executor=executor, node_runner=inner,
                     manifest=manifest, ahead=args.ahead or (2 if assigned else 1), remote=runner,
                     assigned=frozenset(assigned))
    try:
        summary = run_batch(plan, todo, bar, skipped=skipped)
    finally:
        bar.close()
        if runner is not None:
            runner.close()
    return _summarise(summary, manifest)


def _ray_batch_command(args: argparse.Namespace, workflow: Workflow, registry: NodeRegistry,
                       todo: Sequence[BatchItem], manifest: Any, skipped: int, total: int) -> int:
    """``batch --ray``: the same items, manifest and bar, through the Ray pipeline."""
    from diffsplit.batch_run import item_overrides
    from diffsplit.engine.errors import WorkflowError
    from diffsplit.engine.workflow_stages import sampler_nodes, split_stages
    from diffsplit.ray_batch import RayOptions, run_ray_batch
    from diffsplit.ray_stages import StageSettings

    if args.remote:
        raise WorkflowError("--ray runs the sampling nodes in Ray actors; --remote sends nodes to workers: "
                            "give one or the other")
    if condition_settings(args) is not None:
        raise WorkflowError("--conditions auto is not available with --ray (its sampling actors batch "
                            "items in lockstep); run the batch without --ray to prune conditions")
    given = {"--ahead": args.ahead, "--workers": args.workers, "--fallback": args.fallback,
             "--upload-missing": args.upload_missing, "--priority": args.priority,
             "--eager-loaders": getattr(args, "eager_loaders", False)}
    ignored = [flag for flag, value in given.items() if value]
    if ignored:
        raise WorkflowError(f"{', '.join(ignored)} steer workers and local runs; with --ray the pipeline's "
                            "own flags do (--ray-actors, --ray-prepare-actors, --ray-batch)")
    sampling = (tuple(part.strip() for part in args.ray_nodes.split(",") if part.strip())
                if args.ray_nodes else sampler_nodes(workflow, registry))
    split = split_stages(workflow, registry, sampling)  # a workflow that cannot be cut fails here, not in Ray
    source = json.loads(Path(args.workflow).read_text(encoding="utf-8"))
    device = {name: getattr(args, name) for name in ("device", "dtype", "unet_dtype", "vae_dtype",
                                                      "text_encoder_dtype")}
    vram = int(args.vram_gb * (1 << 30)) if args.vram_gb is not None else None
    settings = StageSettings(
        workflow_source=source, sets=tuple(args.set), models=str(Path(args.models).resolve()),
        extra_model_paths=str(Path(args.extra_model_paths).resolve()) if args.extra_model_paths else None,
        inputs=str(Path(args.inputs).resolve()), out=str(Path(args.out).resolve()), sampling=split.sampling,
        device=device, vram_bytes=vram, threads=args.ray_threads or _torch_threads())
    options = RayOptions(address=args.ray, sampling_actors=args.ray_actors,
                         preparing_actors=args.ray_prepare_actors,
                         batch_size=args.ray_batch or (8 if args.ray_gpus else 4),
                         gpus_per_actor=args.ray_gpus, local_cpus=args.ray_cpus)
    if not todo:  # nothing to do: no Ray to start
        from diffsplit.batch_run import BatchSummary

        return _summarise(BatchSummary(0, skipped, 0, 0.0), manifest)
    overrides = {item.key: item_overrides(workflow, registry, item) for item in todo}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    bar = _Bar(total, skipped, args.quiet)
    try:
        summary = run_ray_batch(settings, options, workflow, registry, todo, overrides, manifest, bar,
                                skipped=skipped)
    finally:
        bar.close()
    return _summarise(summary, manifest)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _summarise(summary: Any, manifest: Any) -> int:
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    print(f"batch: {summary.done} done, {summary.skipped} already done, {summary.failed} failed "
          f"in {summary.seconds:.1f}s ({rate:.2f} item/s); manifest: {manifest.path}", file=sys.stderr)
    return 1 if summary.failed else 0
