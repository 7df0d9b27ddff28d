"""The ``diffsplit`` command line: argument parsing and dispatch only.

Each sub-command's work lives in :mod:`diffsplit.commands`; this module
parses arguments, turns diffsplit errors into one clear line and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from diffsplit import __version__
from diffsplit.arg_types import (
    batch_size,
    batch_wait,
    non_negative_int,
    positive_float,
    positive_int,
    positive_seconds,
)
from diffsplit.client_args import add_client_arguments, add_loading_argument, add_priority_argument
from diffsplit.condition_args import add_condition_arguments
from diffsplit.device_args import add_device_arguments
from diffsplit.serve_args import add_serve_arguments
from diffsplit.worker_control import add_control_parsers

EXIT_USAGE = 2
EXIT_FAILED = 1
#: 128 + SIGINT, as shells report a Ctrl-C
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (kept true to the README)."""
    parser = argparse.ArgumentParser(
        prog="diffsplit",
        description="Split diffusion workflows between this machine and remote GPU workers.",
    )
    parser.add_argument("--version", action="version", version=f"diffsplit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a ComfyUI workflow (API or UI format)")
    run.add_argument("workflow", help="workflow JSON file (API format or the editor's UI format)")
    run.add_argument("--models", required=True, help="ComfyUI-style models folder")
    run.add_argument("--extra-model-paths", metavar="YAML",
                     help="ComfyUI extra_model_paths.yaml: more folders for each kind of model")
    run.add_argument("--out", default="out", help="where SaveImage writes (default: ./out)")
    run.add_argument("--inputs", default="input", help="where LoadImage reads (default: ./input)")
    run.add_argument(
        "--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
        help="override an input, e.g. --set 6.steps=4 (repeatable; VALUE is JSON or a string)",
    )
    run.add_argument(
        "--remote", action="append", default=[], metavar="NODE=ADDR",
        help="run a node on a worker: NODE is a node id or a class name (repeatable); ADDR may list "
        "workers, tcp://a:5555,tcp://b:5555: one holding the node's models goes first, else the least "
        "loaded; the next takes over when one is gone or overloaded",
    )
    run.add_argument("--stats", metavar="FILE", help="write per-node timings and wire bytes as JSON")
    run.add_argument("--compare-local", action="store_true",
                     help="after the split run, run the workflow again all here (same --set, --device and "
                     "dtypes; images into a temporary folder) and print, per IMAGE output and saved image, "
                     "the max difference and PSNR (in --stats too: psnr_db \"inf\" when identical); "
                     "needs --remote")
    run.add_argument("--upload-missing", action="store_true",
                     help="send a model file once to a worker that lacks it (needs --allow-upload there)")
    run.add_argument(
        "--workers", type=int, default=None,
        help="nodes run at once (default: 2 when some run remotely, so local work goes on meanwhile; else 1)",
    )
    run.add_argument("--fallback", choices=("local",), default=None,
                     help="local: a node whose workers are all gone or overloaded runs here instead "
                     "(same result); without it the run fails naming the worker")
    add_client_arguments(run)
    add_priority_argument(run)
    add_loading_argument(run)
    add_device_arguments(run, what="the nodes run here")
    add_condition_arguments(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    from diffsplit.batch_command import add_batch_arguments

    add_batch_arguments(sub.add_parser(
        "batch", help="run a workflow once per prompt of a text, JSONL or CSV file (resumable)",
        description="Run the workflow for each item of ITEMS: its prompt and overrides applied, images "
        "named by the item, one manifest line per item (JSON: item, prompt, seed, outputs, workers, times). "
        "Finished items are skipped when the batch is run again; a failed item is recorded and the batch "
        "goes on (exit 1 at the end)."))

    keys = sub.add_parser("keys", help="CURVE key pairs for workers and clients")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new_key = keys_sub.add_parser(
        "new", help="write a key pair: NAME.key (public, give it to the other side) and NAME.key_secret",
        description="Write a CURVE key pair: NAME.key holds the public key (a worker's goes to its "
        "clients' --server-key; a client's into the worker's --curve-clients folder), NAME.key_secret "
        "both keys (mode 0600; --curve-secret on a worker, --curve on a client). Existing files are "
        "never overwritten.",
    )
    new_key.add_argument("name", help="file name stem, e.g. worker or alice")
    new_key.add_argument("--dir", default=".", help="folder to write into (default: the current folder)")

    models = sub.add_parser("models", help="model folder tools")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser("tiny", help="write the tiny seeded model set into DIR")
    tiny.add_argument("dir", help="models folder to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    index = models_sub.add_parser("index", help="hash every model file in DIR (cached) and list them")
    index.add_argument("dir", help="models folder")

    trace = sub.add_parser("trace", help="explain each node's inputs and the loaders behind model inputs")
    trace.add_argument("workflow", help="workflow JSON file")
    trace.add_argument("--models", required=True, help="ComfyUI-style models folder")
    trace.add_argument("--extra-model-paths", metavar="YAML",
                     help="ComfyUI extra_model_paths.yaml: more folders for each kind of model")
    trace.add_argument("--inputs", default="input", help="where LoadImage reads (default: ./input)")
    trace.add_argument("--json", action="store_true", help="print JSON instead of text")
    trace.add_argument("--no-run", action="store_true", help="trace the graph without executing it")

    worker = sub.add_parser(
        "worker", help="serve nodes to clients: rebuild models from recipes, run, reply",
        allow_abbrev=False,  # else `worker status ADDR --curve KEY` reads --curve as --curve-secret/-clients
        description="A worker daemon. Clients send one node at a time with recipes for its models; "
        "the worker finds the files by sha256 in --models, builds the models once (cached by recipe "
        "digest under --cache-gb), runs the node and sends the outputs back. SIGTERM or Ctrl-C stops "
        "it: queued requests are refused, running ones get --grace seconds, then fail clearly; it then "
        "exits 0. If its I/O thread or a slot thread dies it stops the same way but exits 70, so a "
        "supervisor (systemd Restart=on-failure) restarts it.",
    )
    add_worker_arguments(worker)
    add_control_parsers(worker)
    serve = sub.add_parser(
        "serve", help="workers as a Ray Serve application, reachable by the same clients",
        description="Start worker replicas as a Ray Serve application and take client requests on --listen, "
        "as a worker does (same protocol, limits, fair queue, priorities and security). Each node request "
        "goes to a replica that holds its models (Serve's model multiplexing, keyed by the recipe digest); "
        "requests arriving together from any clients are gathered (@serve.batch) and sampled in lockstep "
        "on the replica (--batch-max). SIGTERM or Ctrl-C stops it.", allow_abbrev=False)
    add_worker_arguments(serve)
    add_serve_arguments(serve)

    from diffsplit.profiles.cli import add_plan_arguments, add_profile_arguments

    profile_parser = sub.add_parser(
        "profile", help="measure every node and say which are worth offloading (text, JSON, HTML)")
    add_profile_arguments(profile_parser)
    add_client_arguments(profile_parser)
    plan_parser = sub.add_parser(
        "plan", help="choose the nodes to offload; --apply writes the labelled workflow")
    add_plan_arguments(plan_parser)
    add_client_arguments(plan_parser)

    from diffsplit.genie_command import add_genie_arguments

    add_genie_arguments(sub.add_parser("genie", help="GENIE sampler tools: distill a curvature head"))

    demo = sub.add_parser("demo", help="build tiny models and run a workflow split with a local worker")
    demo.add_argument("--dir", default="demo-output", help="folder for models and images")
    demo.add_argument("--local-only", action="store_true", help="run everything in this process")
    return parser


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """What a worker daemon is told: store, limits, device, batching, security (``worker`` and ``serve``)."""
    # required for the daemon; checked in main() so that `diffsplit worker status ADDR` needs none
    parser.add_argument("--models", help="ComfyUI-style models folder (the store); required")
    parser.add_argument("--extra-model-paths", metavar="YAML",
                     help="ComfyUI extra_model_paths.yaml: more folders for each kind of model")
    parser.add_argument("--listen", default="tcp://127.0.0.1:5555",
                        help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555); beyond loopback it "
                        "needs --curve-secret (or --insecure)")
    parser.add_argument("--cache-gb", type=float, default=8.0, help="model cache budget in GiB (default 8)")
    parser.add_argument("--slots", type=int, default=1,
                        help="nodes run at once (default 1); with a device budget, a node whose models and "
                        "activations do not fit beside the running ones waits, and its client is told why")
    add_device_arguments(parser, what="the worker's nodes")
    parser.add_argument("--batch-max", type=batch_size, default=1, metavar="N",
                        help="sample up to N compatible requests of any clients as one batch: same model, "
                        "sampler, scheduler, steps, denoise and latent shape, each with its own seed, CFG "
                        "and prompts (default 1: off, results bit for bit as unbatched)")
    parser.add_argument("--batch-wait-ms", type=batch_wait, default=10.0, metavar="MS",
                        help="how long a slot waits to gather a batch (default 10)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads per job (default: each job runs with its client's thread count, "
                        "so results equal the client's local run)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests waiting beyond the slots before Overloaded (default 16)")
    parser.add_argument("--max-queue-per-client", type=non_negative_int, default=None, metavar="N",
                        help="requests one client may have waiting beyond the slots (default: half of "
                        "--max-queue), so one client cannot lock the others out")
    parser.add_argument("--max-request-gb", type=positive_float, default=4.0, metavar="GB",
                        help="memory one request's values may take once decoded: tensors, zero tensors "
                        "described by shape, held values (default 4)")
    parser.add_argument("--max-steps", type=positive_int, default=10_000,
                        help="sampling steps one node may run (steps inputs, sigma schedules; default 10000)")
    parser.add_argument("--max-pixels", type=positive_int, default=4096 * 4096,
                        help="width x height x batch of any latent or image a node takes or makes, a latent "
                        "counted at its image size (default 16777216 = 4096x4096)")
    parser.add_argument("--max-batch", type=positive_int, default=64,
                        help="batch size of any latent or image a node takes or makes (default 64)")
    parser.add_argument("--max-upload-gb", type=positive_float, default=16.0, metavar="GB",
                        help="largest model file a client may upload (default 16)")
    parser.add_argument("--max-uploads-per-client", type=positive_int, default=2, metavar="N",
                        help="unfinished uploads one client may have at once (default 2)")
    parser.add_argument("--upload-idle-s", type=positive_float, default=600.0, metavar="S",
                        help="an unfinished upload idle this long is dropped and its file deleted "
                        "(default 600)")
    parser.add_argument("--allow-upload", action="store_true",
                        help="accept model files from clients after MissingModel (checked by sha256); "
                        "needs --curve-secret and --curve-clients (or --insecure on a loopback address)")
    parser.add_argument("--content-dir", metavar="DIR",
                        help="where files clients send by content are kept (LoRA adapters loaded outside a "
                        "trace; never the store; taken only with --allow-upload); default: a temporary "
                        "folder removed when the worker stops")
    parser.add_argument("--hf-cache", metavar="DIR",
                        help="a Hugging Face cache whose files serve recipes besides the store's (files are "
                        "found by sha256, never by a name a client sent); default: the hub library's usual "
                        "cache folder ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)")
    parser.add_argument("--no-hf-cache", action="store_true",
                        help="serve recipes from the store (and content sent by clients) only")
    parser.add_argument("--trust-code", action="store_true",
                        help="run @diffsplit.node steps' code sent by allow-listed CURVE clients (needs both "
                        "--curve-secret and --curve-clients; never accepted from anonymous peers)")
    parser.add_argument("--curve-secret", metavar="FILE",
                        help="this worker's CURVE key pair (a .key_secret file): encrypts the connection")
    parser.add_argument("--curve-clients", metavar="DIR",
                        help="folder of client public keys (*.key) allowed to connect")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds in-flight nodes may finish after SIGTERM (default 30)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow listening beyond loopback without CURVE (a trusted network), and, on a "
                        "loopback address only, --allow-upload without --curve-clients")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat interval in s (default 0.5)")
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0,
                        help="a silent client's requests are cancelled after this many s (default 10)")
    parser.add_argument("--idle-unload-s", type=positive_seconds, default=None, metavar="S",
                        help="drop cached models no job used for S seconds (default: keep them until "
                        "evicted or freed with `diffsplit worker free ADDR`)")
    parser.add_argument("--no-index", dest="index_at_start", action="store_false",
                        help="do not hash the store's models in the background at start (default: hash "
                        "every model not indexed yet, so no request waits for it; progress is logged)")
    parser.add_argument("--log-json", action="store_true",
                        help="log as JSON lines on stderr (one per request: op, client, request id, node, "
                        "outcome, queue_s, run_s, bytes); default: text lines")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffsplit`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker" and args.worker_command is None and args.models is None:
        parser.error("diffsplit worker needs --models DIR (or an action: `diffsplit worker status ADDR`)")
    if args.command == "serve" and args.models is None:
        parser.error("diffsplit serve needs --models DIR")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from diffsplit import commands
    from diffsplit.engine.errors import Interrupted
    from diffsplit.transport.errors import DiffsplitError

    handler = {
        "run": commands.run,
        "batch": commands.batch,
        "models": commands.models,
        "trace": commands.trace,
        "demo": commands.demo,
        "worker": commands.worker,
        "serve": commands.serve,
        "profile": commands.profile,
        "plan": commands.plan,
        "keys": commands.keys,
        "genie": commands.genie,
    }[args.command]
    try:
        return handler(args)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffsplitError as exc:
        print(f"diffsplit {args.command}: error: {exc}", file=sys.stderr)
        remote = _remote_traceback(exc)
        if remote:
            if args.verbose:
                print(f"the worker's traceback:\n{remote.rstrip()}", file=sys.stderr)
            else:
                print("(run with -v to see the worker's traceback)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # a file the user named cannot be written or read: one line, no traceback
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        print(f"diffsplit {args.command}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _remote_traceback(exc: BaseException) -> str:
    """The worker's traceback carried by ``exc`` or an exception it was raised from, else ""."""
    seen: BaseException | None = exc
    while seen is not None:
        text = getattr(seen, "remote_traceback", "")
        if text:
            return str(text)
        seen = seen.__cause__
    return ""


def _describe_os_error(exc: OSError) -> str:
    """``No such file or directory: 'out/stats.json'`` rather than ``[Errno 2] ...``."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {str(exc.filename)!r}" if exc.filename is not None else reason


if __name__ == "__main__":
    raise SystemExit(main())
