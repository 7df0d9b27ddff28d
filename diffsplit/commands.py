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

#: ``diffsplit worker``'s exit code when its I/O or a slot thread died (EX_SOFTWARE); a stop exits 0.
EXIT_WORKER_FAILED = 70


def run(args: argparse.Namespace) -> int:
    """``diffsplit run``: execute a workflow, some nodes perhaps on workers."""
    from diffsplit.condition_args import condition_settings, decisions_json
    from diffsplit.engine.executor import Executor, run_node_locally
    from diffsplit.engine.remote_assign import assign_remotes, describe_assignment

    if getattr(args, "compare_local", False):
        from diffsplit.compare_local import require_remote

        require_remote(args.remote)  # before anything runs
    printer = ProgressPrinter(quiet=args.quiet)
    registry, store, workflow = load_for_run(args)
    assigned = assign_remotes(workflow, registry, args.remote)
    if assigned:
        printer.message("remote nodes:\n" + describe_assignment(assigned, workflow))
    memory = local_device_for(args, printer)
    executor = Executor(
        registry, store, inputs_dir=Path(args.inputs), output_dir=Path(args.out),
        progress=printer.step, max_workers=max(1, args.workers or (2 if assigned else 1)),
        master_dtypes=master_dtypes_for(memory), conditions=condition_settings(args),
    )
    started = time.perf_counter()
    runner = remote_runner_for(assigned, workflow, registry, store, args) if assigned else None
    inner = runner or run_node_locally
    if memory is not None:
        from diffsplit.engine.device_runner import DeviceNodeRunner

        inner = DeviceNodeRunner(inner, memory, elsewhere=lambda node_id: node_id in assigned)
    try:
        result = executor.run(workflow, node_runner=_printing(inner, printer, runner))
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
    for decision in result.conditions:
        printer.message("conditions: " + "\n".join(decision.lines()))
    comparison = None
    if getattr(args, "compare_local", False):
        from diffsplit.compare_local import compare_with_local

        printer.message("compare-local: running the workflow again, all here, for reference")
        comparison = compare_with_local(workflow, registry, store, result, inputs_dir=Path(args.inputs),
                                        memory=memory, max_workers=executor.max_workers)
        for line in comparison.lines():  # the report asked for: printed even with -q
            print(line, file=sys.stderr, flush=True)
    if args.stats:
        stats = {
            "total_s": elapsed,
            "nodes": {
                node_id: {"class_type": workflow.node(node_id).class_type, "wall_s": t.wall_s,
                          "cache_hit": t.cache_hit, "where": _where(runner, node_id)}
                for node_id, t in result.timings.items()
            },
            "remote": runner.stats_json() if runner is not None else {},
            "device": _device_stats(memory),
            "conditions": decisions_json(result.conditions),
        }
        if comparison is not None:
            stats["compare_local"] = comparison.to_json()
        Path(args.stats).write_text(json.dumps(stats, indent=2) + "\n")
    return 0


def load_for_run(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(registry, store, workflow) for ``run`` and ``batch``: ``--set`` applied, validated."""
    from diffsplit.engine.extra_paths import open_store
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.overrides import parse_set_options

    registry = default_registry()
    store = open_store(args.models, args.extra_model_paths)
    workflow = load_workflow(Path(args.workflow), registry)
    overrides = parse_set_options(args.set)
    if overrides:
        workflow = workflow.with_overrides(overrides, registry)
    workflow.validate(registry, store)
    return registry, store, workflow


def local_device_for(args: argparse.Namespace, printer: ProgressPrinter) -> Any:
    """The device memory manager for the nodes run here, or None where they run as loaded (CPU, fp32)."""
    from diffsplit.device_args import describe, local_device_memory

    memory = local_device_memory(args)
    if memory is not None:
        printer.message(f"local nodes compute on {describe(memory)}")
    return memory


def master_dtypes_for(memory: Any) -> Any:
    """The local device's dtype policy where it computes in fp16/bf16 (loaders then keep a half file's
    weights in half, not doubled), else None (models load in float32)."""
    return None if memory is None or memory.policy.all_float32 else memory.policy


def _device_stats(memory: Any) -> dict[str, Any]:
    import dataclasses

    if memory is None:
        return {"device": "cpu", "dtypes": "as loaded (fp32)"}
    return {**dataclasses.asdict(memory.stats()), "dtypes": memory.policy.describe()}


def _printing(inner: Any, printer: ProgressPrinter, remote: Any) -> Any:
    """Wrap a node runner so each node prints a line as it finishes (and where it ran)."""

    def runner(call: Any) -> Any:
        started = time.perf_counter()
        outputs = inner(call)
        where = _where(remote, call.node.id)
        printer.node_done(call.node.id, call.node.class_type, time.perf_counter() - started, where=where)
        return outputs

    return runner


def _where(remote: Any, node_id: str) -> str:
    """``remote``, ``local``, or ``fallback`` for an offloaded node that ran here after its workers failed."""
    from diffsplit.engine.offload import LOCAL

    placement = remote.placement(node_id) if remote is not None else None
    if placement is None:
        return "local"
    return "fallback" if placement == LOCAL else "remote"


def remote_runner_for(assigned: dict[str, str], workflow: Any, registry: Any, store: Any,
                      args: argparse.Namespace, *, on_waiting: Any = None) -> Any:
    from diffsplit.client_args import client_options
    from diffsplit.engine.offload import RemoteRunner
    from diffsplit.engine.trace_workflow import output_recipe_source

    options = client_options(args)
    return RemoteRunner(assigned, output_recipe_source(workflow, registry, store), local_store=store,
                        recipes_for=lambda item: output_recipe_source(item, registry, store),
                        upload_missing=args.upload_missing, settings=options.settings, curve=options.curve,
                        fallback_local=args.fallback == "local", priority=getattr(args, "priority", 0),
                        on_waiting=on_waiting, lazy_loaders=not getattr(args, "eager_loaders", False))


def batch(args: argparse.Namespace) -> int:
    """``diffsplit batch``: the workflow once per item of a prompts file."""
    from diffsplit.batch_command import batch_command

    return batch_command(args)


def keys(args: argparse.Namespace) -> int:
    """``diffsplit keys new NAME``: a CURVE key pair, never over existing files."""
    from diffsplit.transport.auth import generate_keypair, save_keypair
    from diffsplit.transport.errors import DiffsplitError

    if not args.name or Path(args.name).name != args.name or args.name.startswith("."):
        raise DiffsplitError(f"key name {args.name!r} must be a plain file name (no folders): "
                             "give the folder with --dir")
    try:
        public, secret = save_keypair(generate_keypair(), Path(args.dir), args.name, overwrite=False)
    except FileExistsError as exc:  # the CLI prints it as one line naming the file
        why = "a key file of that name exists; nothing was written (choose another NAME or --dir)"
        raise FileExistsError(exc.errno, why, exc.filename) from None
    print(f"public key: {public}  (give it to the other side)")
    print(f"secret key: {secret}  (keep it here, mode 0600)")
    print(f"as a worker: diffsplit worker --curve-secret {secret} --curve-clients CLIENT_KEYS_DIR ...; "
          f"clients pass --server-key {public.name}")
    print(f"as a client: diffsplit run --curve {secret} --server-key WORKER.key ...; "
          f"{public.name} goes into the worker's --curve-clients folder")
    return 0


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


def _hf_cache(args: argparse.Namespace) -> Path | None:
    """The Hugging Face cache a worker reads: --hf-cache, else the usual location, none with --no-hf-cache."""
    from diffsplit.engine.hub_cache_files import default_hub_cache

    if getattr(args, "no_hf_cache", False):
        return None
    given = getattr(args, "hf_cache", None)
    return Path(given) if given else default_hub_cache()


def _worker_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The WorkerConfig limits on what one request or client may ask (``--max-*``, ``--upload-idle-s``)."""
    gib = 1 << 30
    return {
        "max_request_bytes": int(args.max_request_gb * gib), "max_steps": args.max_steps,
        "max_pixels": args.max_pixels, "max_batch": args.max_batch,
        "max_queue_per_client": args.max_queue_per_client, "max_upload_bytes": int(args.max_upload_gb * gib),
        "max_uploads_per_client": args.max_uploads_per_client, "upload_idle_s": args.upload_idle_s,
        "batch_max": args.batch_max, "batch_wait_ms": args.batch_wait_ms,
    }


def _worker_device(args: argparse.Namespace) -> dict[str, Any]:
    """The WorkerConfig device settings (``--device``, the dtypes, ``--vram-gb``)."""
    vram_gb = getattr(args, "vram_gb", None)
    return {
        "device": args.device, "dtype": args.dtype, "unet_dtype": args.unet_dtype,
        "vae_dtype": args.vae_dtype, "text_encoder_dtype": args.text_encoder_dtype,
        "vram_bytes": None if vram_gb is None else int(vram_gb * (1 << 30)),
    }


def worker_config(args: argparse.Namespace) -> Any:
    """The WorkerConfig the worker flags describe (``worker`` and ``serve``); BadRequest for a bad pairing."""
    from diffsplit.remote.errors import BadRequest
    from diffsplit.remote.worker import WorkerConfig
    from diffsplit.transport.auth import ServerCurve, load_keypair, load_public_keys
    from diffsplit.transport.protocol import Settings

    curve = None
    if args.curve_clients and not args.curve_secret:
        raise BadRequest("--curve-clients needs --curve-secret too (the worker's own key pair: "
                         "`diffsplit keys new worker` writes one)")
    if args.curve_secret:
        allowed = load_public_keys(args.curve_clients) if args.curve_clients else None
        if allowed is not None and not allowed:
            print(f"warning: no client keys (*.key) in {args.curve_clients}: no client can connect",
                  file=sys.stderr, flush=True)
        curve = ServerCurve(load_keypair(args.curve_secret), allowed)
    return WorkerConfig(
        models=Path(args.models), listen=args.listen,
        extra_model_paths=Path(args.extra_model_paths) if args.extra_model_paths else None,
        content_dir=Path(args.content_dir) if getattr(args, "content_dir", None) else None,
        hf_cache=_hf_cache(args),
        cache_bytes=int(args.cache_gb * (1 << 30)),
        slots=args.slots, max_queue=args.max_queue, allow_upload=args.allow_upload, threads=args.threads,
        trust_code=args.trust_code, curve=curve, insecure=args.insecure,
        idle_unload_s=getattr(args, "idle_unload_s", None),
        index_at_start=getattr(args, "index_at_start", True), **_worker_limits(args), **_worker_device(args),
        grace_s=args.grace, settings=Settings(heartbeat_interval=args.heartbeat,
                                             heartbeat_timeout=args.heartbeat_timeout),
    )


def worker(args: argparse.Namespace) -> int:
    """``diffsplit worker``: serve until SIGTERM/SIGINT, then finish or fail in-flight work.

    ``diffsplit worker status|free ADDR`` asks a running worker instead (``worker_control``).
    """
    if getattr(args, "worker_command", None):
        from diffsplit.worker_control import command as control_command

        return control_command(args)
    from diffsplit.remote.log_format import configure_worker_logging

    configure_worker_logging(json_lines=getattr(args, "log_json", False))
    from diffsplit.remote.worker import Worker

    config = worker_config(args)
    daemon = Worker(config)
    from diffsplit.device_args import describe

    return run_daemon(daemon, f"diffsplit worker listening on {daemon.endpoint} (models: {config.models}; "
                      f"device: {describe(daemon.memory)})", name="worker")


def run_daemon(daemon: Any, started: str, *, name: str) -> int:
    """Serve until SIGTERM/SIGINT (``started`` is printed first); the exit code (70: it failed on its own)."""
    from diffsplit.remote.worker import WorkerFailed

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: daemon.stop())
    print(started, flush=True)
    code = 0
    try:
        daemon.serve()
    except WorkerFailed as exc:  # not a stop we were asked for: exit non-zero so a supervisor restarts us
        code = EXIT_WORKER_FAILED
        print(f"diffsplit {name} failed: {exc} (exit code {code})", file=sys.stderr, flush=True)
    if daemon.busy:  # a job inside one long step: its thread cannot be joined, so skip interpreter teardown
        print(f"diffsplit {name} stopped (a job was still inside a step)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    print(f"diffsplit {name} stopped", file=sys.stderr, flush=True)
    return code


def serve(args: argparse.Namespace) -> int:
    """``diffsplit serve --ray``: worker replicas as a Ray Serve application behind one client endpoint."""
    from diffsplit.serve_command import serve_command

    return serve_command(args)


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


def genie(args: argparse.Namespace) -> int:
    """``diffsplit genie distill``."""
    from diffsplit.genie_command import distill_command

    return distill_command(args)
