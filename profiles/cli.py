"""``diffsplit profile`` and ``diffsplit plan``: arguments and what each command does.

The main CLI adds the sub-commands with :func:`add_profile_arguments` /
:func:`add_plan_arguments` and dispatches to :func:`profile_command` /
:func:`plan_command`; errors are ``DiffsplitError`` subclasses with one clear line.
Importing this module is cheap: torch and the engine load when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from diffsplit.profiles.errors import ProfileError

from diffsplit.device_args import add_device_arguments

if TYPE_CHECKING:
    from diffsplit.profiles.session import Profile


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="workflow JSON file (API or UI format)")
    parser.add_argument("--models", required=True, help="ComfyUI-style models folder")
    parser.add_argument("--extra-model-paths", metavar="YAML",
                     help="ComfyUI extra_model_paths.yaml: more folders for each kind of model")
    parser.add_argument("--inputs", default="input", help="where LoadImage reads (default: ./input)")
    parser.add_argument("--out", help="where SaveImage writes during the runs (default: a temporary folder)")
    parser.add_argument("--remote", metavar="ADDR",
                        help="a worker (tcp://host:5555): measure the link and remote speed there, "
                             "run the plan")
    parser.add_argument("--link", metavar="SPEC",
                        help="assume this link, e.g. 100mbit,20ms or up=20mbit,down=100mbit,rtt=30ms")
    parser.add_argument("--remote-speed", action="append", default=[], metavar="[NODE|CLASS=]Nx",
                        help="assume the worker is N times faster (8x; KSampler=10x; 6=4x); repeatable")
    parser.add_argument("--queue-delay", type=float, metavar="S",
                        help="assume this worker queue delay per call")
    parser.add_argument("--slots", type=int,
                        help="worker slots to plan for (default: what the worker says, or 1)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured local runs first (default 1)")
    parser.add_argument("--runs", type=int, default=1,
                        help="measured local runs; times are medians (default 1)")
    parser.add_argument("--statistic", choices=("median", "min"), default="median",
                        help="how repeated runs combine (default median; min: the least disturbed run)")
    parser.add_argument("--remote-runs", type=int, default=2,
                        help="runs on the worker; the first warms its cache (default 2)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="offload more nodes only if this fraction faster (default 0.02)")
    parser.add_argument("--emulate-link", action="store_true",
                        help="with --remote and --link: emulate the --link on top of the real link when "
                             "running the plan")
    parser.add_argument("--no-run-plan", action="store_true",
                        help="with --remote: do not run the chosen plan")
    parser.add_argument("--json", metavar="FILE",
                        help="write the profile as JSON (schema diffsplit.profile/1)")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    add_device_arguments(parser, what="the nodes measured and run here")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffsplit profile``."""
    parser.description = ("Measure every node of a workflow (time, CPU, memory, bytes by category, "
                          "wire bytes, naive weight bytes) and recommend what to offload over a link.")
    _common_arguments(parser)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``diffsplit plan``."""
    parser.description = ("Choose the nodes to offload; with --apply, write the workflow with "
                          "_meta.remote labels on them.")
    _common_arguments(parser)
    parser.add_argument("--apply", action="store_true", help="write the labelled workflow (needs -o)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="where --apply writes the workflow (API format)")
    parser.add_argument("--address", metavar="ADDR",
                        help="worker address for the labels (default: --remote)")


def profile_command(args: argparse.Namespace) -> int:
    """``diffsplit profile``: measure, plan, print the table, write JSON/HTML."""
    profile = _run(args)
    from diffsplit.profiles.report import render_text, summary_lines

    if args.quiet:
        print("\n".join(summary_lines(profile)))
    else:
        print(render_text(profile), end="")
    _write_reports(profile, args)
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """``diffsplit plan``: measure, choose the placement, optionally write the labelled workflow."""
    address = args.address or args.remote
    if args.apply and (not args.output or not address):
        raise ProfileError("--apply needs -o FILE and a worker address for the labels "
                           "(--remote or --address)")
    profile = _run(args)
    from diffsplit.profiles.report import profile_condition_report, summary_lines

    print("\n".join(summary_lines(profile)))
    if profile.plan is not None and not args.quiet:
        for verdict in profile.plan.verdicts:
            print(f"  {verdict.node_id:>4} {verdict.class_type}: {verdict.reason}")
        conditions = profile_condition_report(profile)
        if conditions is not None:
            print("\n".join(conditions.lines()))
    _write_reports(profile, args)
    if args.apply:
        if profile.plan is None:
            raise ProfileError("no plan to apply: give --link or --remote")
        _write_labelled(args, profile, str(address))
    return 0


def _run(args: argparse.Namespace) -> Profile:
    from diffsplit.engine.extra_paths import open_store
    from diffsplit.engine.formats import load_workflow
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.engine.remote_assign import check_address
    from diffsplit.engine.trace_workflow import output_recipe_source
    from diffsplit.profiles.link import parse_link
    from diffsplit.profiles.local_device import probe_device
    from diffsplit.profiles.remote_model import parse_remote_speed
    from diffsplit.profiles.remote_runs import RunSetup
    from diffsplit.profiles.session import ProfileSettings, profile_workflow

    from diffsplit.client_args import client_options
    from diffsplit.device_args import local_device_memory

    if args.remote:
        check_address(args.remote, "--remote")
    if args.emulate_link and not (args.remote and args.link):
        raise ProfileError("--emulate-link needs both --remote and --link")
    if args.warmup < 0 or args.runs < 1 or args.remote_runs < 1:
        raise ProfileError("--warmup must be 0 or more, --runs and --remote-runs 1 or more")
    memory = local_device_memory(args)  # a device this machine lacks fails here, before any run
    settings = ProfileSettings(
        address=args.remote, link=parse_link(args.link) if args.link else None,
        speed=parse_remote_speed(args.remote_speed) if args.remote_speed else None,
        queue_s=args.queue_delay, slots=args.slots, warmup_runs=args.warmup, measured_runs=args.runs,
        statistic=args.statistic, remote_runs=args.remote_runs, run_plan=not args.no_run_plan,
        emulate_link=args.emulate_link, tolerance=args.tolerance, device=probe_device(memory),
    )
    registry = default_registry()
    store = open_store(args.models, args.extra_model_paths)
    workflow = load_workflow(Path(args.workflow), registry)
    workflow.validate(registry, store)
    recipes = output_recipe_source(workflow, registry, store)
    options = client_options(args)  # --curve/--server-key/--heartbeat-timeout (diffsplit.client_args)
    with _output_folder(args.out) as output_dir:
        setup = RunSetup(registry, store, recipes, output_dir, inputs_dir=Path(args.inputs),
                         settings=options.settings, curve=options.curve, device_memory=memory)
        return profile_workflow(workflow, setup, settings, name=Path(args.workflow).stem)


@contextlib.contextmanager
def _output_folder(out: str | None) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="diffsplit-profile-") as folder:
        yield Path(folder)


def _write_reports(profile: Profile, args: argparse.Namespace) -> None:
    from diffsplit.profiles.report_html import write_html
    from diffsplit.profiles.report_json import write_profile_json

    if args.json:
        write_profile_json(profile, Path(args.json))
        print(f"wrote {args.json}")
    if args.html:
        write_html(profile, Path(args.html))
        print(f"wrote {args.html}")


def _write_labelled(args: argparse.Namespace, profile: Profile, address: str) -> None:
    from diffsplit.engine.formats import load_workflow, save_api_format
    from diffsplit.engine.graph import Workflow, node_sort_key
    from diffsplit.engine.nodes.registry import default_registry

    assert profile.plan is not None
    workflow = load_workflow(Path(args.workflow), default_registry())
    remote = labelled_remote(profile)
    nodes = {}
    for node_id, node in workflow.nodes.items():
        meta = {key: value for key, value in node.meta.items() if key != "remote"}
        if node_id in remote:
            meta["remote"] = address
        nodes[node_id] = replace(node, meta=meta)
    labelled = Workflow(nodes, workflow.source_format, workflow.extra)
    Path(args.output).write_text(json.dumps(save_api_format(labelled), indent=2) + "\n")
    chosen = ", ".join(sorted(remote, key=node_sort_key)) or "none"
    print(f"wrote {args.output} ({len(remote)} node(s) labelled remote: {chosen})")


def labelled_remote(profile: Profile) -> set[str]:
    """The nodes ``plan --apply`` labels remote: the plan's, with the condition preprocessors where the
    subtask manager puts them (``profiles.condition_plan``) when the plan sends other work to the worker
    (the hints are then needed there); the plan's own choice for them otherwise."""
    from diffsplit.profiles.condition_plan import REMOTE
    from diffsplit.profiles.report import profile_condition_report

    assert profile.plan is not None
    remote = set(profile.plan.remote)
    report = profile_condition_report(profile)
    if report is None or not remote - set(report.where):
        return remote
    for node_id, where in report.where.items():
        if where == REMOTE:
            remote.add(node_id)
        else:
            remote.discard(node_id)
    return remote

