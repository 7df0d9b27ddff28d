"""What each ``diffsplit`` sub-command does (the CLI only parses arguments)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from diffsplit.progress import ProgressPrinter


def run(args: argparse.Namespace) -> int:
    """``diffsplit run``: execute a workflow, some nodes perhaps on workers."""
    from diffsplit.engine.executor import Executor, run_node_locally
    from diffsplit.engine.extra_paths import open_store
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.overrides import parse_set_options
    from diffsplit.engine.remote_assign import assign_remotes, describe_assignment

    printer = ProgressPrinter(quiet=args.quiet)
    registry = default_registry()
    store = open_store(args.models, args.extra_model_paths)
    workflow = load_workflow(Path(args.workflow), registry)
    overrides = parse_set_options(args.set)
    if overrides:
        workflow = workflow.with_overrides(overrides, registry)
    workflow.validate(registry, store)
    assigned = assign_remotes(workflow, registry, args.remote)
    if assigned:
        printer.message("remote nodes:\n" + describe_assignment(assigned, workflow))
    executor = Executor(
        registry, store, inputs_dir=Path(args.inputs), output_dir=Path(args.out),
        progress=printer.step, max_workers=max(1, args.workers or (2 if assigned else 1)),
    )
    started = time.perf_counter()
    runner = _remote_runner(assigned, workflow, registry, store, args.upload_missing) if assigned else None
    try:
        result = executor.run(workflow, node_runner=_printing(runner or run_node_locally, printer, assigned))
    finally:
        if runner is not None:
            runner.close()
    elapsed = time.perf_counter() - started
    for node_id, timing in result.timings.items():
        if timing.cache_hit:
            printer.node_done(node_id, workflow.node(node_id).class_type, 0.0, cached=True)
    for path in result.saved_files:
        print(path)
    printer.message(f"done in {elapsed:.2f}s ({len(result.executed)} nodes ran)")
    if args.stats:
        stats = {
            "total_s": elapsed,
            "nodes": {
                node_id: {"class_type": workflow.node(node_id).class_type, "wall_s": t.wall_s,
                          "cache_hit": t.cache_hit, "where": "remote" if node_id in assigned else "local"}
                for node_id, t in result.timings.items()
            },
            "remote": runner.stats_json() if runner is not None else {},
        }
        Path(args.stats).write_text(json.dumps(stats, indent=2) + "\n")
    return 0


def _printing(inner: Any, printer: ProgressPrinter, assigned: dict[str, str]) -> Any:
    """Wrap a node runner so each node prints a line as it finishes."""

    def runner(call: Any) -> Any:
        started = time.perf_counter()
        outputs = inner(call)
        where = "remote" if call.node.id in assigned else "local"
        printer.node_done(call.node.id, call.node.class_type, time.perf_counter() - started, where=where)
        return outputs

    return runner


def _remote_runner(
    assigned: dict[str, str], workflow: Any, registry: Any, store: Any, upload_missing: bool
) -> Any:
    from diffsplit.engine.offload import RemoteRunner
    from diffsplit.engine.trace_workflow import output_recipe_source

    return RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                        upload_missing=upload_missing)


def models(args: argparse.Namespace) -> int:
    """``diffsplit models tiny|index``."""
    if args.models_command == "tiny":
        from diffsplit.engine.models.tiny import describe, write_tiny_models

        root = Path(args.dir)
        model_set = write_tiny_models(root, seed=args.seed)
        print(describe(model_set))
        return 0
    from diffsplit.engine.store import ModelStore

    store = ModelStore(Path(args.dir))
    for folder in store.folders():
        for name in store.names(folder):
            entry = store.entry(store.resolve(folder, name))
            print(f"{entry.sha256}  {entry.bytes:>14,}  {folder}/{name}")
    return 0


def trace(args: argparse.Namespace) -> int:
    """``diffsplit trace``: inputs by category and the loader chain behind each model input."""
    from diffsplit.engine.extra_paths import open_store
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.trace_workflow import trace_workflow

    registry = default_registry()
    store = open_store(args.models, args.extra_model_paths)
    workflow = load_workflow(Path(args.workflow), registry)
    workflow.validate(registry, store)
    result = trace_workflow(workflow, registry, store, execute=not args.no_run, inputs_dir=Path(args.inputs))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.report_text())
    return 0


def worker(args: argparse.Namespace) -> int:
    """``diffsplit worker``: serve until SIGTERM/SIGINT, then finish or fail in-flight work."""
    from diffsplit.remote.worker import Worker, WorkerConfig
    from diffsplit.transport.auth import ServerCurve, load_keypair, load_public_keys
    from diffsplit.transport.protocol import Settings

    curve = None
    if args.curve_secret:
        allowed = load_public_keys(args.curve_clients) if args.curve_clients else None
        curve = ServerCurve(load_keypair(args.curve_secret), allowed)
    config = WorkerConfig(
        models=Path(args.models), listen=args.listen,
        extra_model_paths=Path(args.extra_model_paths) if args.extra_model_paths else None,
        cache_bytes=int(args.cache_gb * (1 << 30)),
        slots=args.slots, max_queue=args.max_queue, allow_upload=args.allow_upload, threads=args.threads,
        trust_code=args.trust_code, curve=curve,
        grace_s=args.grace, settings=Settings(heartbeat_interval=args.heartbeat,
                                             heartbeat_timeout=args.heartbeat_timeout),
    )
    daemon = Worker(config)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: daemon.stop())
    print(f"diffsplit worker listening on {daemon.endpoint} (models: {config.models})", flush=True)
    daemon.serve()
    if daemon.busy:  # a job inside one long step: its thread cannot be joined, so skip interpreter teardown
        print("diffsplit worker stopped (a job was still inside a step)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    print("diffsplit worker stopped", file=sys.stderr, flush=True)
    return 0


def demo(args: argparse.Namespace) -> int:
    """``diffsplit demo``: tiny models, a local worker, the demo workflow split across it."""
    from diffsplit.demo import run_demo

    return run_demo(Path(args.dir), local_only=args.local_only)


def profile(args: argparse.Namespace) -> int:
    """``diffsplit profile``: measure each node (here and on a worker, or a what-if)."""
    from diffsplit.profiles.cli import profile_command

    return profile_command(args)


def plan(args: argparse.Namespace) -> int:
    """``diffsplit plan``: the offload plan, optionally written into the workflow."""
    from diffsplit.profiles.cli import plan_command

    return plan_command(args)
